"""Data of the built-in models (label tables ``imagenet1k.tsv`` and ``species100.tsv``) and the pinned
weights they run on (:mod:`speciesclf.models.weights`)."""

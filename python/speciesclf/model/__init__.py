"""The classifier: runtimes that run a model file, postprocessing (scores, labels, the unknown rule),
the built-in models and their weights, and :class:`~speciesclf.model.classifier.Classifier` itself."""

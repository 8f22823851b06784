"""Real bundles for the rollout tests and benchmark: the shared MobileNetV2 (species100) under several
versions in a registry, a bad one whose labels point at the wrong model outputs, and hooks that make a
version slow or failing.

Needs the built-in model's weights (``SPECIESCLF_WEIGHTS`` pointing at the shared models folder).
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["GOOD", "PRIMARY", "SHUFFLED", "failing_hooks", "make_registry", "slow_hooks"]

PRIMARY = "1.0.0"
GOOD = "1.1.0"  # the same weights under a new version
SHUFFLED = "1.2.0"  # the same label names in the same order, each pointing at another model output


def make_registry(root: str | Path, versions: tuple[str, ...] = (PRIMARY, GOOD, SHUFFLED), *, seed: int = 0):
    """A :class:`~speciesclf.Registry` at ``root`` holding ``species100`` at ``versions``; ``production``
    points at the first. The built-in bundle is assembled once (in ``SPECIESCLF_HOME``) and re-versioned."""
    from speciesclf import Label, Registry, create_bundle
    from speciesclf.model.builtin import builtin_bundle

    base = builtin_bundle("species100")
    manifest = base.manifest
    registry = Registry(root)
    work = Path(root) / ".build"
    work.mkdir(parents=True, exist_ok=True)
    for n, version in enumerate(versions):
        labels = list(base.labels)
        if version == SHUFFLED:
            outputs = [label.index for label in labels]
            random.Random(seed).shuffle(outputs)
            labels = [Label(index=o, name=label.name, scientific_name=label.scientific_name)
                      for label, o in zip(labels, outputs)]
        out = create_bundle(
            work / f"species100-{version}", model_file=base.model_path, labels=labels, name="species100",
            version=version, framework=manifest.framework, preprocess=manifest.preprocess, output_kind=manifest.output_kind,
            num_outputs=manifest.num_outputs, label_subset=tuple(label.index for label in labels),
            unknown=manifest.unknown, temperature=manifest.temperature, embedding_output=manifest.embedding_output,
            lineage={"parent_version": None if n == 0 else versions[0], "training_data": "ImageNet-1k (ILSVRC 2012)"},
            notes=f"species100 re-versioned for the rollout tests ({version})", copy_model=False)
        registry.register(out, aliases=("production",) if n == 0 else ())
    return registry


def slow_hooks(factor: float = 3.0) -> dict[str, Any]:
    """Hooks that make every predict call take ``factor`` times as long (sleeping after it for the rest)."""
    started = threading.local()

    def before(classifier, items):
        started.t = time.perf_counter()

    def after(classifier, predictions):
        time.sleep((factor - 1) * (time.perf_counter() - started.t))

    return {"before_predict": before, "after_predict": after}


def failing_hooks(rate: float = 0.05, seed: int = 0) -> dict[str, Any]:
    """Hooks under which a predict call raises with probability ``rate`` (a model server falling over)."""
    rng = random.Random(seed)
    lock = threading.Lock()

    def before(classifier, items):
        with lock:
            fail = rng.random() < rate
        if fail:
            raise RuntimeError("injected candidate failure")

    return {"before_predict": before}

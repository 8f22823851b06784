"""Fast stand-ins for classifiers in the rollout tests: they follow the predict protocol and answer from a
deterministic function of the image bytes, optionally wrong, failing or slow."""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from pathlib import Path

from speciesclf import Label, ModelOutputError, Prediction, PreprocessSpec, Registry, create_bundle
from speciesclf.errors import DecodeError

LABELS = [f"class{i}" for i in range(10)]


def _index(item: Any) -> int:
    data = bytes(item) if isinstance(item, (bytes, bytearray, memoryview)) else repr(item).encode()
    return hashlib.sha256(data).digest()[0] % len(LABELS)


class FakeClassifier:
    """``model`` is name@version. ``shift`` moves every answer to another class (a wrong model); ``fail``
    makes every call raise; ``delay_s`` (per call) and ``item_delay_s`` (per image) make calls take time;
    ``nan_class0`` gives a ModelOutputError on the items whose class is 0; an item ``b"corrupt"`` gets a
    DecodeError (the image's own fault)."""

    def __init__(self, model: str = "m@1.0.0", *, shift: int = 0, fail: bool = False, nan_class0: bool = False,
                 delay_s: float = 0.0, item_delay_s: float = 0.0, labels: list[str] | None = None,
                 spec: PreprocessSpec | None = None):
        self.model = model
        self.labels = list(labels or LABELS)
        self.spec = spec or PreprocessSpec()
        self.device = "cpu"
        self.batch_size = 8
        self.shift, self.fail, self.nan_class0, self.delay_s = shift, fail, nan_class0, delay_s
        self.item_delay_s = item_delay_s
        self.calls = 0
        self.closed = False
        self._lock = threading.Lock()

    def predict_batch(self, xs, top_k: int = 5, **options):
        with self._lock:
            self.calls += 1
        if self.closed:
            raise RuntimeError("Classifier is closed")
        if self.fail:
            raise RuntimeError("injected failure")
        xs = list(xs)
        if self.delay_s or self.item_delay_s:
            time.sleep(self.delay_s + self.item_delay_s * len(xs))
        out = []
        for x in xs:
            if isinstance(x, bytes) and x == b"corrupt":
                out.append(Prediction(None, None, None, [], False, self.model, {}, error=DecodeError("not an image")))
                continue
            k = (_index(x) + self.shift) % len(self.labels)
            if self.nan_class0 and _index(x) == 0:
                out.append(Prediction(None, None, None, [], False, self.model, {}, error=ModelOutputError("NaN")))
                continue
            name = self.labels[k]
            out.append(Prediction(name, 0.9, k, [(name, 0.9)], False, self.model, {}, guess=name, open_set_score=0.9))
        return out

    def close(self) -> None:
        self.closed = True


def tiny_registry(root: Path, versions: tuple[str, ...] = ("1.0.0", "1.1.0")) -> Registry:
    """A registry holding ``m`` at ``versions`` (``production`` at the first) whose model files are never
    loaded: for the tests of the rollout state, which only move aliases."""
    registry = Registry(root / "registry")
    for version in versions:
        folder = root / f"src-{version}"
        folder.mkdir(parents=True)
        (folder / "model.onnx").write_bytes(b"never loaded")
        create_bundle(root / f"bundle-{version}", model_file=folder / "model.onnx", labels=[Label(0, "a"), Label(1, "b")],
                      name="m", version=version, framework="onnx", num_outputs=2)
        registry.register(root / f"bundle-{version}", aliases=("production",) if version == versions[0] else ())
    return registry

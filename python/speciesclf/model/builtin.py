"""The built-in models: ImageNet MobileNetV2 (int8 ONNX) as ``imagenet1k`` and restricted to 100 animal
species as ``species100``. Their bundles are assembled on first use from the pinned weights."""

from __future__ import annotations

import functools
import importlib.resources
import os
import tempfile
import uuid
from pathlib import Path

from ..preprocessing.spec import PreprocessSpec

__all__ = ["BUILTIN_MODELS", "builtin_bundle", "imagenet_labels", "species100_labels"]

VERSION = "1.0.0"
BUILTIN_MODELS = ("species100", "imagenet1k")

# The MobileNetV2 recipe from the ONNX Model Zoo: shorter side 256, centre crop 224, ImageNet mean/std.
MOBILENET_SPEC = PreprocessSpec(size=224, resize=256)

# species100 flags an image "unknown" when less than half of the 1000-way probability falls on its 100
# species: the model then believes the photo shows something else. Measured on the shared photos (the only
# labelled data here, so in-sample; docs/classifier.md has the sweep): every threshold from 0.2 to 0.6 keeps
# top-1 >= 0.85 on the species' photos and >= 90% of non-animal photos unknown; 0.5 is the one with a meaning.
SPECIES100_UNKNOWN_MASS = 0.5

# The built-in models' embedding: MobileNetV2's pooled 1280-d features, the input of its final QLinearMatMul,
# dequantized. Added to the graph as the output "embedding" once, when a built-in bundle is assembled.
EMBEDDING_OUTPUT = "embedding"
MOBILENET_EMBEDDING = dict(tensor="472_quantized", scale="464_scale", zero_point="464_zero_point",
                           shape=("batch_size", 1280))


def _data_file(name: str) -> Path:
    return Path(str(importlib.resources.files("speciesclf.model").joinpath("labels", name)))


def imagenet_labels() -> list:
    from ..bundles.bundle import read_labels

    return read_labels(_data_file("imagenet1k.tsv"))


def species100_labels() -> list:
    from ..bundles.bundle import read_labels

    return read_labels(_data_file("species100.tsv"))


def _home() -> Path:
    from ..bundles.registry import default_home

    return default_home()


def builtin_bundle(ref: str):
    """The bundle of a built-in model (``species100``, ``species100@1.0.0``, ``imagenet1k``...)."""
    from ..bundles.bundle import Bundle
    from .weights import weights_path
    from ..bundles.registry import DEFAULT_ALIAS, RegistryError, split_ref

    # The registry's own parser: "species100@" is refused here as it is there, and a bare name means
    # name@production, the one alias a built-in has.
    name, version = split_ref(ref)
    if name not in BUILTIN_MODELS:
        raise RegistryError(f"{name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)})")
    if version not in (VERSION, DEFAULT_ALIAS):
        raise RegistryError(
            f"built-in {name} has version {VERSION} and the alias {DEFAULT_ALIAS!r} only, not {version!r}"
        )
    target = _home() / "builtin" / f"{name}-{VERSION}"
    if target.is_dir():
        try:
            bundle = Bundle.open(target)
        except ValueError:  # damaged (a hash that no longer matches, a missing file): set aside, rebuild
            _set_aside(target, "damaged")
        else:
            if bundle.manifest.embedding_output is not None or not _onnx_available():
                return bundle
            _set_aside(target, "without-embedding")  # assembled before embeddings, or without onnx then
    weights = weights_path()
    with tempfile.TemporaryDirectory(prefix="speciesclf-builtin-") as work:
        model, embedding = _model_with_embedding(weights, Path(work))
        # copy_model=False hard-links: the bundle keeps the file after `work` is gone.
        common = dict(model_file=model, name=name, version=VERSION, framework="onnx", preprocess=MOBILENET_SPEC,
                      output_kind="logits", num_outputs=1000, copy_model=False,
                      embedding_output=embedding,
                      lineage={"parent_version": None, "training_data": "ImageNet-1k (ILSVRC 2012)"})
        _create(target, common, name)
    return Bundle.open(target)


def _create(target: Path, common: dict, name: str) -> None:
    from ..bundles.bundle import UnknownRule, create_bundle

    if name == "imagenet1k":
        kwargs = dict(labels=imagenet_labels(), notes="MobileNetV2 1.0 224, int8 QDQ, ONNX Model Zoo")
    else:
        labels = species100_labels()
        kwargs = dict(labels=labels, label_subset=tuple(label.index for label in labels),
                      unknown=UnknownRule("subset_mass", SPECIES100_UNKNOWN_MASS),
                      notes="MobileNetV2 1.0 224 int8 restricted to 100 animal species; unknown when the "
                            "probability mass on them is low")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        create_bundle(target, **common, **kwargs)
    except FileExistsError:
        pass  # another process built it first


def _set_aside(target: Path, why: str) -> None:
    try:
        target.rename(target.with_name(f"{target.name}.{why}-{uuid.uuid4().hex[:8]}"))
    except FileNotFoundError:
        pass  # another process set it aside first


def _onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def _model_with_embedding(weights: Path, work: Path) -> tuple[Path, str | None]:
    """The weights with the embedding output added (written under ``work``), or the weights as they are
    when the onnx package is missing (the built-ins then have no embedding)."""
    if not _onnx_available():
        return weights, None
    stat = weights.stat()
    path = work / weights.name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(_edited_weights(str(weights), stat.st_size, stat.st_mtime_ns))
    return path, EMBEDDING_OUTPUT


@functools.lru_cache(maxsize=2)
def _edited_weights(path: str, size: int, mtime_ns: int) -> bytes:
    # The edit (shape inference and the ONNX checker: about a second) is done once per process for both
    # built-ins; the bundles it goes into are the cache across processes. Size and mtime key the file.
    from .runtimes.onnx_graph import add_output

    return add_output(Path(path).read_bytes(), name=EMBEDDING_OUTPUT, **MOBILENET_EMBEDDING)

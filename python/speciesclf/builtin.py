"""The built-in models: ImageNet MobileNetV2 (int8 ONNX) as ``imagenet1k`` and restricted to 100 animal
species as ``species100``. Their bundles are assembled on first use from the pinned weights."""

from __future__ import annotations

import importlib.resources
import uuid
from pathlib import Path

from .spec import PreprocessSpec

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


def _data_file(name: str) -> Path:
    return Path(str(importlib.resources.files("speciesclf.models").joinpath(name)))


def imagenet_labels() -> list:
    from .bundle import read_labels

    return read_labels(_data_file("imagenet1k.tsv"))


def species100_labels() -> list:
    from .bundle import read_labels

    return read_labels(_data_file("species100.tsv"))


def _home() -> Path:
    from .registry import default_home

    return default_home()


def builtin_bundle(ref: str):
    """The bundle of a built-in model (``species100``, ``species100@1.0.0``, ``imagenet1k``...)."""
    from .bundle import Bundle, UnknownRule, create_bundle
    from .models.weights import weights_path
    from .registry import DEFAULT_ALIAS, RegistryError, split_ref

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
            return Bundle.open(target)
        except ValueError:  # damaged (a hash that no longer matches, a missing file): set aside, rebuild
            target.rename(target.with_name(f"{target.name}.damaged-{uuid.uuid4().hex[:8]}"))
    weights = weights_path()
    common = dict(model_file=weights, name=name, version=VERSION, framework="onnx", preprocess=MOBILENET_SPEC,
                  output_kind="logits", num_outputs=1000, copy_model=False,
                  lineage={"parent_version": None, "training_data": "ImageNet-1k (ILSVRC 2012)"})
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
    return Bundle.open(target)

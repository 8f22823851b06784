"""Inference runtimes: a model file in, ``run(batch) -> outputs`` out.

Other packages add formats through the ``speciesclf.loaders`` entry-point group: an entry point named after
a framework (e.g. ``tflite``) resolves to ``load(path, *, device, threads) -> runtime``, where ``runtime``
has ``run(batch: numpy.ndarray) -> numpy.ndarray`` and optionally ``name`` and ``device`` attributes, an
``input_signature`` (a :class:`ModelInput`, checked against the preprocessing spec at load) and
``run_with_embedding(batch) -> (outputs, embeddings)`` with ``has_embedding = True``.
The ``suffixes`` attribute of the loader (a tuple like ``(".tflite",)``) lets raw model files pick it.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import tempfile
import weakref
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol

from ...bundles.bundle import BundleError

__all__ = ["Runtime", "ModelInput", "ModelInputError", "ModelLoadError", "load_runtime", "framework_for_file"]

_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".pt2": "torch-export"}


class ModelLoadError(RuntimeError):
    """The runtime could not load the model file (not valid ONNX, a corrupt TorchScript archive...).

    Each runtime's own exception (onnxruntime's InvalidProtobuf is no RuntimeError) is its ``__cause__``.
    """


class ModelInputError(BundleError):
    """The model's declared input does not fit the preprocessing spec (rank, channels, image size, dtype),
    or the model takes more than the one image input speciesclf feeds it. Raised at load, naming both."""


@dataclasses.dataclass(frozen=True)
class ModelInput:
    """A model's declared image input: ``shape`` has None for a dimension the model leaves free (a symbolic
    batch size), and is None itself when the model declares no shape at all; ``dtype`` is a NumPy-style
    name, or None where the runtime converts its input itself."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str | None

    def describe(self) -> str:
        if self.shape is None:
            return f"{self.name!r}: {self.dtype or 'any dtype'} [shape not declared]"
        dims = ", ".join("N" if i == 0 and d is None else ("?" if d is None else str(d))
                         for i, d in enumerate(self.shape))
        return f"{self.name!r}: {self.dtype or 'any dtype'} [{dims}]"


class Runtime(Protocol):
    name: str
    device: str

    def run(self, batch: Any) -> Any: ...


def _plugin_loaders() -> dict[str, Callable]:
    return {ep.name: ep for ep in metadata.entry_points(group="speciesclf.loaders")}


def framework_for_file(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in _SUFFIXES:
        return _SUFFIXES[suffix]
    for name, ep in _plugin_loaders().items():
        loader = ep.load()
        if suffix in tuple(getattr(loader, "suffixes", ())):
            return name
    raise ValueError(f"cannot tell the model format of {Path(path).name!r} from its suffix; known: {sorted(_SUFFIXES)}")


def load_runtime(path: str | Path, framework: str, *, backend: str = "auto", device: str = "auto",
                 threads: int | None = None, options: dict[str, Any] | None = None,
                 data: bytes | None = None, embedding_output: str | None = None) -> Runtime:
    """Load ``path`` (a model of ``framework``) with the runtime ``backend`` picks.

    ``options`` go to the runtime: for torch, ``dtype`` ("float32", "float16" or "bfloat16", the last two
    on GPUs) and ``channels_last``. ``data``, when given, is the model file's content already read (and
    checked against a bundle's sha256): the built-in runtimes load it instead of reopening ``path``, which
    then only names the model in messages. Plugins take a path: with ``data`` they get a private copy of
    the checked bytes, kept while the runtime lives. A model the runtime cannot parse raises
    :class:`ModelLoadError`. ``embedding_output`` names the model output with its penultimate features
    (a bundle's ``manifest.embedding_output``); a plugin runtime offers it with ``run_with_embedding``.
    """
    options = dict(options or {})
    if backend not in ("auto", "onnxruntime", "torch"):
        plugins = _plugin_loaders()
        if backend in plugins:
            return _load_plugin(plugins[backend], path, data, device=device, threads=threads)
        raise ValueError(f"backend must be 'auto', 'onnxruntime', 'torch' or a speciesclf.loaders plugin, got {backend!r}")
    if framework == "onnx":
        if backend == "torch":
            raise ValueError("an ONNX model needs the onnxruntime backend")
        from .ort import OnnxRuntime

        return OnnxRuntime(path, device=device, threads=threads, data=data, embedding_output=embedding_output,
                           **options)
    if framework in ("torchscript", "torch-export"):
        if backend == "onnxruntime":
            raise ValueError(f"a {framework} model needs the torch backend")
        from .torch_runtime import TorchRuntime

        return TorchRuntime(path, framework=framework, device=device, threads=threads, data=data,
                            embedding_output=embedding_output, **options)
    plugins = _plugin_loaders()
    if framework in plugins:
        return _load_plugin(plugins[framework], path, data, device=device, threads=threads)
    raise ValueError(f"no runtime for framework {framework!r} (install a speciesclf.loaders plugin for it)")


def _load_plugin(entry_point: Any, path: str | Path, data: bytes | None, *, device: str,
                 threads: int | None) -> Runtime:
    """A plugin opens the path it is given; handing it the bundle's own path would load whatever replaced
    the file after its sha256 was checked. So it gets a copy of the checked bytes in a private directory,
    removed when the runtime is collected (or at exit, for runtimes that take no weak references). The
    files beside the model (a format's weights or config files, which the manifest's sha256 never covered)
    stay reachable there as links to the bundle's own."""
    loader = entry_point.load()
    if data is None:
        return loader(path, device=device, threads=threads)
    directory = tempfile.mkdtemp(prefix="speciesclf-model-")
    try:
        copy = Path(directory) / Path(path).name  # the same name: plugins may look at the suffix
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _link_neighbours(Path(path), Path(directory))
        runtime = loader(str(copy), device=device, threads=threads)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        weakref.finalize(runtime, shutil.rmtree, directory, True)
    except TypeError:
        atexit.register(shutil.rmtree, directory, True)
    return runtime


def _link_neighbours(model: Path, directory: Path) -> None:
    try:
        neighbours = [entry for entry in model.parent.iterdir() if entry.name != model.name]
    except OSError:
        return
    for entry in neighbours:
        try:
            os.symlink(entry.resolve(), directory / entry.name)
        except OSError:  # no symlinks here (some Windows accounts): the plugin sees the model alone
            pass

"""Inference runtimes: a model file in, ``run(batch) -> outputs`` out.

Other packages add formats through the ``speciesclf.loaders`` entry-point group: an entry point named after
a framework (e.g. ``tflite``) resolves to ``load(path, *, device, threads) -> runtime``, where ``runtime``
has ``run(batch: numpy.ndarray) -> numpy.ndarray`` and optionally ``name`` and ``device`` attributes.
The ``suffixes`` attribute of the loader (a tuple like ``(".tflite",)``) lets raw model files pick it.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Protocol

__all__ = ["Runtime", "ModelLoadError", "load_runtime", "framework_for_file"]

_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".pt2": "torch-export"}


class ModelLoadError(RuntimeError):
    """The runtime could not load the model file (not valid ONNX, a corrupt TorchScript archive...).

    Each runtime's own exception (onnxruntime's InvalidProtobuf is no RuntimeError) is its ``__cause__``.
    """


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
                 data: bytes | None = None) -> Runtime:
    """Load ``path`` (a model of ``framework``) with the runtime ``backend`` picks.

    ``options`` go to the runtime: for torch, ``dtype`` ("float32", "float16" or "bfloat16", the last two
    on GPUs) and ``channels_last``. ``data``, when given, is the model file's content already read (and
    checked against a bundle's sha256): the built-in runtimes load it instead of reopening ``path``, which
    then only names the model in messages. Plugins get ``path``. A model the runtime cannot parse raises
    :class:`ModelLoadError`.
    """
    options = dict(options or {})
    if backend not in ("auto", "onnxruntime", "torch"):
        plugins = _plugin_loaders()
        if backend in plugins:
            return plugins[backend].load()(path, device=device, threads=threads)
        raise ValueError(f"backend must be 'auto', 'onnxruntime', 'torch' or a speciesclf.loaders plugin, got {backend!r}")
    if framework == "onnx":
        if backend == "torch":
            raise ValueError("an ONNX model needs the onnxruntime backend")
        from .ort import OnnxRuntime

        return OnnxRuntime(path, device=device, threads=threads, data=data, **options)
    if framework in ("torchscript", "torch-export"):
        if backend == "onnxruntime":
            raise ValueError(f"a {framework} model needs the torch backend")
        from .torch_runtime import TorchRuntime

        return TorchRuntime(path, framework=framework, device=device, threads=threads, data=data, **options)
    plugins = _plugin_loaders()
    if framework in plugins:
        return plugins[framework].load()(path, device=device, threads=threads)
    raise ValueError(f"no runtime for framework {framework!r} (install a speciesclf.loaders plugin for it)")

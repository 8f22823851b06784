"""What this installation can do: version, native module, codecs, threads, SIMD, CUDA."""

from __future__ import annotations

import json

from .preprocessing import _backend, _cuda
from .errors import CudaUnavailableError
from ._version import __version__

__all__ = ["build_info", "info", "format_info"]


def build_info() -> dict:
    """What the native modules were compiled with (empty codecs when the CPU module did not load; CUDA
    and nvJPEG as the separate CUDA module says, which this loads)."""
    if _backend._native is None:
        built = {"version": __version__, "codecs": {}, "turbojpeg": False, "simd": [], "cuda": False, "nvjpeg": False}
    else:
        built = dict(_backend._native.build_info())
    built["cuda"] = _cuda.built_with_cuda()
    if built["cuda"]:
        try:
            cuda = _cuda.native_cuda().build_info()
        except CudaUnavailableError as e:
            built["cuda_error"] = str(e)
        else:
            built.update(nvjpeg=cuda["nvjpeg"], cuda_toolkit=cuda["cuda_toolkit"],
                         cuda_architectures=cuda["cuda_architectures"])
    return built


def info() -> dict:
    built = build_info()
    from PIL import __version__ as pillow_version

    return {
        "version": __version__,
        "native": _backend.native_available(),
        "native_error": None if _backend.native_available() else str(_backend.NATIVE_IMPORT_ERROR),
        "backend": _backend.resolve("auto"),
        "codecs": built["codecs"],
        "pillow_fallback_formats": ["GIF", "BMP", "TIFF", "animated WebP"]
        + [f.upper() for f in ("jpeg", "png", "webp") if f not in built["codecs"]],
        "pillow": pillow_version,
        "threads": _backend.default_threads(),
        "simd": built["simd"],
        "compiler": built.get("compiler"),
        "cuda": built["cuda"],
        "nvjpeg": built["nvjpeg"],
        "gpu": _gpu_line(),
    }


def _gpu_line() -> str:
    usable, why = _cuda.cuda_status()
    return f"usable: {why}" if usable else f"not usable: {why}"


def format_info(data: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps(data, indent=2)
    width = max(map(len, data))
    lines = []
    for key, value in data.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "none"
        elif isinstance(value, list):
            value = ", ".join(map(str, value)) or "none"
        lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)

"""What this installation can do: version, native module, codecs, threads, SIMD, CUDA."""

from __future__ import annotations

import json

from . import _backend
from ._version import __version__

__all__ = ["build_info", "info", "format_info"]


def build_info() -> dict:
    """What the native module was compiled with (empty codecs and no CUDA when it did not load)."""
    if _backend._native is None:
        return {"version": __version__, "codecs": {}, "turbojpeg": False, "simd": [], "cuda": False, "nvjpeg": False}
    return dict(_backend._native.build_info())


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
        "cuda_reason": None if built["cuda"] else "speciesclf was built without CUDA",
    }


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

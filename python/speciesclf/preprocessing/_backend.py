"""Which implementation runs: the native extension when it loaded, else the Pillow path."""

from __future__ import annotations

import os

try:
    from .. import _native
except ImportError as e:  # a source checkout without a build, or a missing system library
    _native = None
    NATIVE_IMPORT_ERROR: ImportError | None = e
else:
    NATIVE_IMPORT_ERROR = None

BACKENDS = ("auto", "native", "python")


def native_available() -> bool:
    return _native is not None


def resolve(backend: str) -> str:
    """'native' or 'python'. SPECIESCLF_BACKEND replaces 'auto'; an explicit choice wins over it."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("SPECIESCLF_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"SPECIESCLF_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "native" if _native is not None else "python"
    if backend == "native" and _native is None:
        raise RuntimeError(f"the native backend is not available: {NATIVE_IMPORT_ERROR}")
    return backend


def default_threads() -> int:
    """SPECIESCLF_NUM_THREADS, else the cores this process may run on."""
    value = os.environ.get("SPECIESCLF_NUM_THREADS")
    if value:
        threads = int(value)
        if threads < 1:
            raise ValueError(f"SPECIESCLF_NUM_THREADS must be >= 1, got {value!r}")
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1

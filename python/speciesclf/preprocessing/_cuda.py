"""Loads speciesclf's CUDA module on first use, so that the package imports where no CUDA library exists."""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import threading
from pathlib import Path
from types import ModuleType

from ..errors import CudaUnavailableError

__all__ = ["native_cuda", "built_with_cuda", "cuda_status"]

BUILT_WITHOUT_CUDA = "speciesclf was built without CUDA"

_lock = threading.Lock()
_module: ModuleType | None = None


def built_with_cuda() -> bool:
    return importlib.util.find_spec("speciesclf._native_cuda") is not None


def _preload_nvjpeg() -> None:
    """Loads libnvjpeg from the nvidia-nvjpeg wheel when the module's RUNPATH did not find it (a layout
    other than site-packages/{speciesclf,nvidia})."""
    spec = importlib.util.find_spec("nvidia")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for library in sorted(Path(folder).glob("cu*/lib/libnvjpeg.so*")):
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
            return


def native_cuda() -> ModuleType:
    """speciesclf._native_cuda, or CudaUnavailableError saying why it cannot be had."""
    global _module
    with _lock:
        if _module is not None:
            return _module
        if not built_with_cuda():
            raise CudaUnavailableError(f"{BUILT_WITHOUT_CUDA}: GPU preprocessing is not available in this build")
        try:
            _module = importlib.import_module("speciesclf._native_cuda")
        except ImportError as first:
            try:
                _preload_nvjpeg()
                _module = importlib.import_module("speciesclf._native_cuda")
            except (ImportError, OSError):
                raise CudaUnavailableError(f"the CUDA part of speciesclf could not be loaded: {first}") from first
        return _module


def cuda_status() -> tuple[bool, str]:
    """(usable, why not): whether GPU preprocessing can run in this process."""
    try:
        module = native_cuda()
    except CudaUnavailableError as e:
        return False, str(e)
    runtime = module.runtime_info()
    if runtime["driver_version"] == 0:
        return False, "no NVIDIA driver found"
    if runtime["device_count"] == 0:
        return False, "no CUDA device found"
    import torch

    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} cannot use the GPU (a CPU-only build of torch?)"
    return True, f"{runtime['device_count']} CUDA device(s), driver {runtime['driver_version']}"

"""preprocess_batch: many images in, one model-ready batch out, with a typed error per failed item."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import numbers
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Literal

import numpy as np

from . import _backend
from ._pillow_backend import PillowPreprocessor
from ..errors import CODEC_UNAVAILABLE, ImageError, error_from_status
from .inputs import ImageInput, as_source
from .spec import BFLOAT16_NAN, PreprocessSpec

__all__ = ["Batch", "preprocess_batch"]

_FILTER_CODES = {"bilinear": 0, "bicubic": 1}
_DTYPE_CODES = {"float32": 0, "float16": 1, "uint8": 2, "bfloat16": 3}
_LAYOUT_CODES = {"NCHW": 0, "NHWC": 1}


@dataclasses.dataclass(frozen=True)
class Batch:
    """The result of :func:`preprocess_batch`.

    ``array`` has one slot per input (``out`` itself when one was given). ``ok[i]`` says whether slot ``i``
    holds an image; a failed slot is NaN (float dtypes) or 0 (uint8) and its error is ``errors[i]``.
    """

    array: Any
    ok: np.ndarray
    errors: dict[int, ImageError]
    seconds: np.ndarray | None = None  # with timings=True: (N, 2) seconds decoding and resizing each item

    def __len__(self) -> int:
        return len(self.ok)

    @property
    def all_ok(self) -> bool:
        return not self.errors

    def valid(self) -> Any:
        """Only the slots that hold images, in input order."""
        return self.array[np.flatnonzero(self.ok)] if self.errors else self.array


def preprocess_batch(
    items: Iterable[ImageInput],
    spec: PreprocessSpec = PreprocessSpec(),
    *,
    threads: int | None = None,
    backend: Literal["auto", "native", "python"] = "auto",
    out: Any = None,
    on_error: Literal["raise", "skip"] = "raise",
    timings: bool = False,
    device: str = "cpu",
) -> Batch:
    """Decode, resize, crop and normalise ``items`` into one (N, 3, size, size) batch (or NHWC).

    Items may be encoded bytes, paths, HxW[xC] uint8 arrays or PIL images, mixed freely. ``out`` may be a
    NumPy array or a CPU torch tensor (pinned or not) of the spec's dtype, C-contiguous, with at least
    N rows; it is written in place and never reallocated. With ``on_error="raise"`` the error of the first
    failed item is raised once the whole batch has been processed; with ``"skip"`` failures are reported
    in ``Batch.ok`` and ``Batch.errors``.

    ``device="cuda"`` (or ``"cuda:N"``) preprocesses on that GPU and returns a torch CUDA tensor (see
    :class:`speciesclf.preprocessing.gpu.GpuPreprocessor`, the owned object to keep when calling in a loop; this function
    keeps one per thread). A ``bfloat16`` spec returns a torch tensor on either device.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, numbers.Integral)
                                or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    device = str(device)
    if device != "cpu":
        if not (device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        from . import gpu

        gpu.check_cuda_device(device)  # "cuda:abc" is a ValueError here, before anything touches CUDA
        if backend == "python":
            raise ValueError("backend='python' runs on the CPU; use device='cpu' with it")
        if timings:
            raise ValueError("timings=True times each item on the CPU path; the GPU path works batch-wide")
        return gpu.preprocessor_for_thread(spec, device, threads)(items, out=out, on_error=on_error)
    chosen = _backend.resolve(backend)
    threads = _backend.default_threads() if threads is None else int(threads)
    items = list(items)
    n = len(items)
    array, result = _output_buffer(out, spec, n)
    seconds = np.zeros((n, 2)) if timings else None

    errors: dict[int, ImageError] = {}
    sources: list[Any] = []
    slots: list[int] = []
    for i, item in enumerate(items):
        try:
            sources.append(as_source(item, spec.max_bytes, spec.max_pixels))
            slots.append(i)
        except ImageError as e:
            errors[i] = e

    if chosen == "native":
        leftovers = _run_native(sources, slots, array, spec, threads, errors, seconds)
    else:
        leftovers = list(zip(slots, sources))
    if leftovers:
        _run_pillow(leftovers, array, spec, threads, errors, seconds)

    ok = np.ones(n, dtype=bool)
    for i in errors:
        ok[i] = False
        array[i] = BFLOAT16_NAN if spec.dtype == "bfloat16" else np.nan if array.dtype.kind == "f" else 0
    if on_error == "raise" and errors:
        first = min(errors)
        error = errors[first]
        error.add_note(f"speciesclf: item {first} of a batch of {n}")
        raise error
    return Batch(result, ok, errors, seconds)


def _run_native(sources, slots, array, spec, threads, errors, seconds) -> list[tuple[int, Any]]:
    """Runs the native core; returns the (slot, source) pairs it leaves to Pillow."""
    native = _backend._native
    failures = native.preprocess(
        sources,
        array,
        size=spec.size,
        resize=spec.resize or 0,
        filter=_FILTER_CODES[spec.interpolation],
        dtype=_DTYPE_CODES[spec.dtype],
        layout=_LAYOUT_CODES[spec.layout],
        mean=list(spec.mean),
        std=list(spec.std),
        max_pixels=spec.max_pixels,
        max_bytes=spec.max_bytes,
        reduce_margin=spec.jpeg_reduce_margin or 0.0,
        threads=threads,
        slots=slots,
        timings=seconds,
    )
    leftovers = []
    by_slot = None
    for slot, status, message in failures:
        if status == CODEC_UNAVAILABLE:
            if by_slot is None:
                by_slot = dict(zip(slots, sources))
            leftovers.append((slot, by_slot[slot]))
        else:
            errors[slot] = error_from_status(status, message)
    return leftovers


# One pool for every call: a pool per threads= value would leave each one's threads alive forever.
_executor: ThreadPoolExecutor | None = None
_executor_size = 0
_executor_lock = threading.Lock()


def _submit_all(threads: int, fn, args: list) -> list:
    """Runs fn(arg) for each arg on the shared pool, grown to at least ``threads`` workers."""
    global _executor, _executor_size
    with _executor_lock:  # submitting under the lock: no task can land on a pool being replaced
        if _executor is None or _executor_size < threads:
            old = _executor
            _executor = ThreadPoolExecutor(threads, thread_name_prefix="speciesclf-pillow")
            _executor_size = threads
            if old is not None:
                old.shutdown(wait=False)  # its queued tasks still run; its threads exit once idle
        return [_executor.submit(fn, arg) for arg in args]


def _forget_pool_in_child() -> None:
    # A forked child has none of the parent's worker threads, but the executor's books say they are idle
    # and it would start none: work submitted there would wait forever. The child makes its own.
    global _executor, _executor_size, _executor_lock
    _executor, _executor_size, _executor_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_in_child)


def _run_pillow(work: list[tuple[int, Any]], array, spec, threads, errors, seconds) -> None:
    run_one = PillowPreprocessor(spec)

    def task(slot_source):
        slot, source = slot_source
        try:
            run_one(source, array[slot], None if seconds is None else seconds[slot])
        except ImageError as e:
            return slot, e
        except MemoryError as e:
            return slot, ImageError(f"out of memory: {e}")
        return slot, None

    if threads == 1 or len(work) == 1:
        results = list(map(task, work))
    else:
        # The pool may be larger than this call's threads: `threads` tasks, each a share of the work,
        # keep this call to its own concurrency.
        shares = [work[i::threads] for i in range(min(threads, len(work)))]
        futures = _submit_all(threads, lambda share: [task(one) for one in share], shares)
        results = [result for future in futures for result in future.result()]
    for slot, error in results:
        if error is not None:
            errors[slot] = error


def _output_buffer(out: Any, spec: PreprocessSpec, n: int) -> tuple[np.ndarray, Any]:
    """(NumPy view to write, object to return). ``out`` is checked, never reallocated."""
    shape = spec.output_shape(n)
    if out is None:
        array = np.empty(shape, dtype=spec.numpy_dtype)
        if spec.dtype == "bfloat16":
            import torch

            return array, torch.from_numpy(array).view(torch.bfloat16)
        return array, array
    if type(out).__module__.startswith("torch"):
        return _torch_out(out, spec, shape)
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array or a CPU torch tensor, got {type(out).__name__}")
    if spec.dtype == "bfloat16":
        raise TypeError("a bfloat16 spec writes to a torch.bfloat16 tensor (NumPy has no bfloat16)")
    _check_out(out.shape, out.dtype, out.flags.c_contiguous, spec, shape)
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    return out[:n], out[:n]


def _torch_out(out: Any, spec: PreprocessSpec, shape) -> tuple[np.ndarray, Any]:
    import torch

    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a numpy array or a CPU torch tensor, got {type(out).__name__}")
    if out.device.type != "cpu":
        raise ValueError(f"out is on {out.device}; CPU preprocessing writes to CPU memory (pinned is fine)")
    expected = torch_dtype(spec)
    if out.dtype != expected:
        raise ValueError(f"out has dtype {out.dtype}, the spec needs {expected}")
    _check_out(tuple(out.shape), spec.numpy_dtype, out.is_contiguous(), spec, shape)
    if shape[0] and not _writable(out.data_ptr(), out[: shape[0]].nbytes):
        raise ValueError("out is read-only")
    if spec.dtype == "bfloat16":
        view = out.detach().view(torch.int16).numpy().view(np.uint16)
    else:
        view = out.detach().numpy()
    return view[: shape[0]], out[: shape[0]]


def _writable(address: int, nbytes: int) -> bool:
    """Whether the first and last byte of [address, address + nbytes) are writable memory.

    A tensor carries no read-only flag (torch.from_numpy drops NumPy's), so the memory itself is asked: the
    kernel writes one byte there through readv, which fails with EFAULT on a read-only page where a store
    from this process would crash it. The byte written is the one read, and rows we are about to fill.
    """
    if not hasattr(os, "readv") or not hasattr(os, "pipe"):
        return True  # no way to ask without risking a crash (Windows)
    read_end, write_end = os.pipe()
    try:
        for at in {address, address + nbytes - 1}:
            os.write(write_end, ctypes.string_at(at, 1))
            try:
                os.readv(read_end, [(ctypes.c_char * 1).from_address(at)])
            except OSError as e:
                if e.errno == errno.EFAULT:
                    return False
                raise
    finally:
        os.close(read_end)
        os.close(write_end)
    return True


def torch_dtype(spec: PreprocessSpec):
    """The torch dtype of the spec's output (the spec's dtype names are torch's own)."""
    import torch

    return getattr(torch, spec.dtype)


def _check_out(got_shape, got_dtype, contiguous: bool, spec: PreprocessSpec, shape) -> None:
    if np.dtype(got_dtype) != spec.numpy_dtype:
        raise ValueError(f"out has dtype {np.dtype(got_dtype)}, the spec needs {spec.numpy_dtype}")
    if len(got_shape) != 4 or tuple(got_shape[1:]) != shape[1:] or got_shape[0] < shape[0]:
        raise ValueError(f"out has shape {tuple(got_shape)}, need ({shape[0]} or more, {', '.join(map(str, shape[1:]))})")
    if not contiguous:
        raise ValueError("out must be C-contiguous")

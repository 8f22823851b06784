"""GPU preprocessing: encoded images to a normalised torch CUDA batch.

JPEGs are decoded by nvJPEG (the GPU's hardware JPEG engine where it has one, nvJPEG's hybrid decoder
otherwise); what nvJPEG does not take (PNG, WebP, CMYK JPEGs, broken files) is decoded by the same CPU
core as ``device="cpu"``, so errors are the same typed errors. Two CUDA kernels then resize, crop,
normalise and lay out every image straight into the output tensor, with the CPU path's fixed-point
arithmetic (``csrc/fused_resize.h``). The result matches the CPU path within the decoders' differences
(nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's); see docs/gpu.md.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Iterable, Literal

import numpy as np

from . import _backend, _cuda
from ._cuda import cuda_status
from ..errors import CODEC_UNAVAILABLE, CudaUnavailableError, GpuError, ImageError, error_from_status
from .inputs import ImageInput, as_source
from .preprocess import _DTYPE_CODES, _FILTER_CODES, _LAYOUT_CODES, Batch, torch_dtype
from .spec import PreprocessSpec

__all__ = ["GpuPreprocessor", "cuda_status", "preprocessor_for_thread"]


_CUDA_DEVICE = re.compile(r"cuda(:[0-9]+)?")


def check_cuda_device(device: Any) -> None:
    """ValueError unless ``device`` names a CUDA device: "cuda", "cuda:N", an index N >= 0 or a torch.device.
    Checked without importing torch or touching CUDA, so a bad argument reads the same on every machine."""
    if isinstance(device, str):
        ok = _CUDA_DEVICE.fullmatch(device) is not None
    elif isinstance(device, int) and not isinstance(device, bool):
        ok = device >= 0
    else:
        ok = type(device).__name__ == "device" and getattr(device, "type", None) == "cuda"
    if not ok:
        raise ValueError(f"device must be 'cuda', 'cuda:N' (N >= 0) or a CUDA torch.device, got {device!r}")


class GpuPreprocessor:
    """An owned GPU pipeline: its own CUDA stream, nvJPEG state and device buffers, reused batch after batch.

    Calls on one object are serialised; separate objects (one per thread, say) run independently.
    ``max_batch`` bounds a single native call: larger inputs are processed in chunks of that many.
    """

    def __init__(
        self,
        spec: PreprocessSpec = PreprocessSpec(),
        device: Any = "cuda",
        *,
        threads: int | None = None,
        max_batch: int = 256,
        nvjpeg: bool = True,
        hardware_decoder: bool = True,
    ) -> None:
        if not isinstance(spec, PreprocessSpec):
            raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an int >= 1, got {max_batch!r}")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        check_cuda_device(device)  # arguments first: a typo is a ValueError on any machine
        native = _cuda.native_cuda()  # raises "speciesclf was built without CUDA" first, where that is so
        usable, why = cuda_status()
        if not usable:
            raise CudaUnavailableError(f"GPU preprocessing is not available: {why}")
        import torch

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device!r}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.spec = spec
        self.threads = _backend.default_threads() if threads is None else threads
        self.max_batch = int(max_batch)
        self._torch = torch
        self._dtype = torch_dtype(spec)
        self._lock = threading.Lock()
        try:
            self._pipeline = native.GpuPipeline(
                size=spec.size, resize=spec.resize or 0, filter=_FILTER_CODES[spec.interpolation],
                dtype=_DTYPE_CODES[spec.dtype], layout=_LAYOUT_CODES[spec.layout], mean=list(spec.mean),
                std=list(spec.std), max_pixels=spec.max_pixels, max_bytes=spec.max_bytes,
                reduce_margin=spec.jpeg_reduce_margin or 0.0, device=self.device.index, nvjpeg=nvjpeg,
                hardware_decoder=hardware_decoder,
            )
        except native.CudaError as e:
            raise GpuError(str(e)) from e
        self._native = native

    @property
    def decoder(self) -> str:
        """"nvjpeg (hardware + hybrid)", "nvjpeg (hybrid)" or "cpu" (a build without nvJPEG)."""
        return self._pipeline.decoder

    @property
    def stream(self) -> int:
        """The raw cudaStream_t this object works on (torch.cuda.ExternalStream can wrap it)."""
        return self._pipeline.stream

    def last_routes(self) -> dict[str, int]:
        """How the previous call's items were decoded: nvjpeg_hardware, nvjpeg_hybrid, cpu, pixels, failed."""
        return self._pipeline.last_routes()

    def close(self) -> None:
        """Frees the device memory and the stream now rather than at garbage collection."""
        self._pipeline.close()

    def __enter__(self) -> GpuPreprocessor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(
        self,
        items: Iterable[ImageInput],
        *,
        out: Any = None,
        on_error: Literal["raise", "skip"] = "raise",
        wait_for_torch: bool = True,
    ) -> Batch:
        """Preprocesses ``items`` into ``out`` (a CUDA tensor of the spec's dtype on this device,
        C-contiguous, at least N rows; allocated when None) and returns it in a :class:`Batch`.

        The tensor is complete when this returns, so it may be used on any stream. By default the work
        waits for what torch's current stream has already queued, since ``out`` may still be in use there;
        with ``wait_for_torch=False`` (for an ``out`` known to be idle) it overlaps that work instead, which
        is how a Classifier preprocesses the next batch while the model runs.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        torch = self._torch
        items = list(items)
        n = len(items)
        shape = self.spec.output_shape(n)
        if out is None:
            out = torch.empty(shape, dtype=self._dtype, device=self.device)
        else:
            self._check_out(out, shape)
        errors: dict[int, ImageError] = {}
        sources: list[Any] = []
        slots: list[int] = []
        for i, item in enumerate(items):
            try:
                sources.append(as_source(item, self.spec.max_bytes, self.spec.max_pixels))
                slots.append(i)
            except ImageError as e:
                errors[i] = e
        stream = self.stream if wait_for_torch else -1  # DLPack: -1 asks torch for no synchronisation
        with self._lock, torch.cuda.device(self.device):
            leftovers = self._run(sources, slots, out, errors, stream)
            if leftovers:
                self._run_pillow_decoded(leftovers, out, errors, stream)
        ok = np.ones(n, dtype=bool)
        for i in errors:
            ok[i] = False
            out[i] = 0 if self.spec.dtype == "uint8" else float("nan")
        if on_error == "raise" and errors:
            first = min(errors)
            error = errors[first]
            error.add_note(f"speciesclf: item {first} of a batch of {n}")
            raise error
        return Batch(out[:n], ok, errors)

    def _run(self, sources: list[Any], slots: list[int], out: Any, errors: dict[int, ImageError], stream: int) -> list:
        """Runs the native pipeline in chunks of max_batch; returns the (slot, source) pairs left to Pillow."""
        leftovers = []
        for start in range(0, len(sources), self.max_batch):
            chunk, chunk_slots = sources[start:start + self.max_batch], slots[start:start + self.max_batch]
            try:
                failures = self._pipeline.run(chunk, out.__dlpack__(stream=stream), chunk_slots, self.threads)
            except self._native.CudaError as e:
                raise GpuError(str(e)) from e
            by_slot = dict(zip(chunk_slots, chunk))
            for slot, status, message in failures:
                if status == CODEC_UNAVAILABLE:
                    leftovers.append((slot, by_slot[slot]))
                else:
                    errors[slot] = error_from_status(status, message)
        return leftovers

    def _run_pillow_decoded(self, work: list, out: Any, errors: dict[int, ImageError], stream: int) -> None:
        """Formats this build cannot decode natively (GIF, BMP, TIFF, ...): Pillow decodes, the GPU resizes."""
        from ._pillow_backend import open_upright

        pixels, slots = [], []
        for slot, source in work:
            try:
                image, _, _ = open_upright(bytes(source), max_pixels=self.spec.max_pixels,
                                           max_bytes=self.spec.max_bytes, margin=0.0)
                pixels.append(np.ascontiguousarray(np.asarray(image)))
                slots.append(slot)
            except ImageError as e:
                errors[slot] = e
            except MemoryError as e:
                errors[slot] = ImageError(f"out of memory: {e}")
        if pixels:
            self._run(pixels, slots, out, errors, stream)

    def _check_out(self, out: Any, shape: tuple[int, ...]) -> None:
        torch = self._torch
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch CUDA tensor, got {type(out).__name__}")
        if out.device != self.device:
            raise ValueError(f"out is on {out.device}, this preprocessor runs on {self.device}")
        if out.dtype != self._dtype:
            raise ValueError(f"out has dtype {out.dtype}, the spec needs {self._dtype}")
        if out.dim() != 4 or tuple(out.shape[1:]) != shape[1:] or out.shape[0] < shape[0]:
            raise ValueError(f"out has shape {tuple(out.shape)}, need ({shape[0]} or more, "
                             f"{', '.join(map(str, shape[1:]))})")
        if not out.is_contiguous():
            raise ValueError("out must be C-contiguous")


_per_thread = threading.local()


def preprocessor_for_thread(spec: PreprocessSpec, device: str, threads: int | None) -> GpuPreprocessor:
    """The calling thread's GpuPreprocessor for (spec, device, threads): kept, so that preprocess_batch in
    a loop reuses its buffers; one per thread, so that threads never wait on each other."""
    cache = getattr(_per_thread, "cache", None)
    if cache is None:
        cache = _per_thread.cache = {}
    key = (spec, device, threads)
    if key not in cache:
        if len(cache) >= 4:  # a thread that cycles through specs keeps only its latest few pipelines
            cache.pop(next(iter(cache))).close()
        cache[key] = GpuPreprocessor(spec, device, threads=threads)
    return cache[key]

"""Classifier: a model with its preprocessing, labels and post-processing, behind predict()."""

from __future__ import annotations

import base64
import collections
import dataclasses
import html
import io
import numbers
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

from ..bundles.bundle import BundleError
from ..errors import GpuError, ImageError, ModelOutputError, ModelRuntimeError, error_body
from ..sources.fetch import UrlPolicy
from .postprocess import PostProcessor, top_k_indices
from ..preprocessing.preprocess import preprocess_batch
from .runtimes import framework_for_file, load_runtime
from ..sources.sources import to_image_source
from ..preprocessing.spec import PreprocessSpec

__all__ = ["Classifier", "Prediction", "Predictions", "check_model_io"]

_MODEL_SUFFIXES = (".onnx", ".pt", ".pth", ".pt2")


@dataclasses.dataclass
class Prediction:
    """One image's answer. ``error`` is set (and the rest empty) when the image could not be used.

    ``label`` is the reported class: None when the open-set rule says "unknown" (and on error), so an
    unknown image never names a species. ``guess`` is the best reported class whatever the rule said,
    ``score`` its probability among the reported classes and ``index`` its model output; ``open_set_score``
    is what the rule compared with its threshold (see :class:`~speciesclf.model.postprocess.PostProcessor`).
    ``logits`` (the model's raw outputs, all of them) and ``embedding`` (its penultimate pooled features,
    float32 1-D) are set only when asked for (``return_logits=True``, ``return_embedding=True``).
    """

    label: str | None
    score: float | None  # the probability of ``guess``
    index: int | None  # the model output index of ``guess``
    top_k: list[tuple[str, float]]
    unknown: bool
    model: str  # name@version
    timings: dict[str, float]  # decode_ms, preprocess_ms, inference_ms
    error: ImageError | ModelOutputError | None = None
    scientific_name: str | None = None  # of ``label``: None when unknown
    guess: str | None = None
    open_set_score: float | None = None
    logits: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    embedding: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    #: Which side of a :class:`~speciesclf.rollout.Deployment` answered: "primary" or "candidate"; None from
    #: a plain Classifier. ``model`` is then the version on that side.
    arm: str | None = None
    # A small JPEG of the model's input, made only for notebooks (see Classifier.thumbnails): never the
    # input itself, which would keep every image of a large batch alive.
    _thumbnail: bytes | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        """JSON-ready. ``logits`` and ``embedding`` appear (as lists) only when they were asked for."""
        data = {
            "label": self.label,
            "guess": self.guess,
            "score": self.score,
            "index": self.index,
            "scientific_name": self.scientific_name,
            "open_set_score": self.open_set_score,
            "unknown": self.unknown,
            "top_k": [{"label": label, "score": score} for label, score in self.top_k],
            "model": self.model,
            "timings": dict(self.timings),
            "error": None if self.error is None else error_body(self.error),
        }
        if self.arm is not None:
            data["arm"] = self.arm
        if self.logits is not None:
            data["logits"] = [float(v) for v in self.logits]
        if self.embedding is not None:
            data["embedding"] = [float(v) for v in self.embedding]
        return data

    def _repr_html_(self) -> str:
        if self.error is not None:
            return (f"<div><b>{html.escape(type(self.error).__name__)}</b>: {html.escape(str(self.error))}"
                    f" <small>({html.escape(self.model)})</small></div>")
        if self.unknown:
            title = (f"unknown <small>(guess: {html.escape(self.guess or '')} {self.score:.3f}; "
                     f"open-set score {self.open_set_score:.3f})</small>")
        else:
            title = html.escape(self.label or "")
            if self.scientific_name:
                title += f" <i>({html.escape(self.scientific_name)})</i>"
            if self.open_set_score is not None:
                title += f" <small>(open-set score {self.open_set_score:.3f})</small>"
        # When unknown, every bar is a guess: the caption says so.
        caption = "<caption style='text-align:left'><small>guesses</small></caption>" if self.unknown else ""
        bars = "".join(
            f"<tr><td>{html.escape(label)}</td><td><div style='background:{'#aaaaaa' if self.unknown else '#4a90d9'};"
            f"height:10px;width:{max(1, round(score * 160))}px'></div></td><td>{score:.3f}</td></tr>"
            for label, score in self.top_k
        )
        thumb = _thumbnail_html(self._thumbnail)
        return (f"<div style='display:flex;gap:12px;align-items:flex-start'>{thumb}<div><b>{title}</b>"
                f"<table>{caption}{bars}</table><small>{html.escape(self.model)}</small></div></div>")


def _thumbnail_html(jpeg: bytes | None) -> str:
    if not jpeg:
        return ""
    return (f"<img src='data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}' "
            f"title='the model input' style='width:{_THUMBNAIL_SIDE}px'/>")


_THUMBNAIL_SIDE = 112  # at most; half the usual 224 (a 2x2 box average)
_GRID_MAX = 500  # predictions a notebook grid shows; the rest are counted


class Predictions(list):
    """What :meth:`Classifier.predict_batch` returns: a plain list of :class:`Prediction` that a notebook
    shows as a grid."""

    def _repr_html_(self) -> str:
        cells = "".join(f"<div style='border:1px solid #ddd;border-radius:4px;padding:6px;width:360px'>"
                        f"{p._repr_html_()}</div>" for p in self[:_GRID_MAX])
        more = f"<p><small>and {len(self) - _GRID_MAX} more</small></p>" if len(self) > _GRID_MAX else ""
        return f"<div style='display:flex;flex-wrap:wrap;gap:8px'>{cells}</div>{more}"


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (IPython with a kernel attached), where predictions are shown as HTML."""
    ipython = sys.modules.get("IPython")  # never imported here: without it in use, this is no notebook
    get_ipython = getattr(ipython, "get_ipython", None)
    if get_ipython is None:
        return False
    try:
        shell = get_ipython()
    except Exception:  # noqa: BLE001 - a broken IPython is no notebook to draw in
        return False
    return shell is not None and getattr(shell, "kernel", None) is not None


def _thumbnails(array: Any, slots: Sequence[int], spec: PreprocessSpec) -> dict[int, bytes]:
    """Small JPEGs of the given rows of a batch of model inputs (what the model saw: the resized crop).

    Made from the batch the model ran on, so every input kind gets one (a path, bytes, a file object, PIL,
    NumPy, torch, a URL) without decoding anything twice or keeping the input."""
    from PIL import Image

    if not len(slots):
        return {}
    if isinstance(array, np.ndarray):
        slots = list(slots)
        # Read in place (the sums below copy) when the rows are the first ones, as in a batch without failures.
        rows = array[:len(slots)] if slots == list(range(len(slots))) else array[slots]
        if spec.dtype == "bfloat16":  # stored as the upper 16 bits of float32
            rows = (rows.astype(np.uint32) << 16).view(np.float32)
    else:  # a torch tensor (GPU preprocessing): one copy to the host for the whole batch
        import torch

        index = torch.as_tensor(list(slots), device=array.device)
        rows = array.index_select(0, index)
        rows = (rows if rows.dtype == torch.uint8 else rows.float()).cpu().numpy()
    # Scaled down first, by an integer factor (a box average: 224 -> 112), while still in the stored layout:
    # the rest (denormalising, transposing) then touches a quarter of the values.
    factor = max(1, spec.size // _THUMBNAIL_SIDE)
    side = spec.size // factor
    if spec.layout == "NHWC":
        rows = rows.transpose(0, 3, 1, 2)  # a view: the sums below read it in place
    end = side * factor
    total = np.zeros((len(rows), 3, side, side), np.float32)
    for dy in range(factor):  # factor x factor strided sums: far faster than a mean over reshaped axes
        for dx in range(factor):
            total += rows[:, :, dy:end:factor, dx:end:factor]
    rows = (total / (factor * factor)).transpose(0, 2, 3, 1)
    if spec.dtype != "uint8":
        rows = rows * (np.asarray(spec.std, np.float32) * 255) + (np.asarray(spec.mean, np.float32) * 255)
    rows = np.clip(rows + 0.5, 0, 255).astype(np.uint8)  # + 0.5: rounds when truncated
    thumbnails = {}
    for slot, pixels in zip(slots, rows):
        image = Image.fromarray(pixels)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
        thumbnails[slot] = buffer.getvalue()
    return thumbnails


@dataclasses.dataclass(frozen=True)
class _OutputCheck:
    """What the model's output width must be for the reported names to line up with its columns.

    Checked against the runtime's static output shape at load where it has one, and against every batch
    of outputs (a shape comparison) where it does not, so a wrong bundle never answers with wrong names.
    """

    ref: str
    num_outputs: int | None  # manifest.num_outputs, None when the manifest does not say
    label_indices: tuple[int, ...]  # unique (Bundle.open and Label ensure it)
    max_subset: int | None  # the highest manifest.label_subset index; None without a subset

    def check_labels(self) -> None:
        """Without a subset, column i is reported as label i: the labels must be 0..K-1, without gaps."""
        if self.max_subset is None and max(self.label_indices) != len(self.label_indices) - 1:
            present = set(self.label_indices)
            missing = [i for i in range(max(self.label_indices)) if i not in present][:10]
            raise BundleError(
                f"labels: without manifest.label_subset the labels of {self.ref} must cover 0..K-1 (one per model "
                f"output); missing: {', '.join(map(str, missing))}. Label every output or set manifest.label_subset"
            )

    def check_width(self, width: int) -> None:
        if self.num_outputs is not None and width != self.num_outputs:
            raise BundleError(
                f"manifest.num_outputs: {self.ref} says {self.num_outputs}, but its model has {width} outputs"
            )
        if self.max_subset is not None and self.max_subset >= width:
            raise BundleError(
                f"manifest.label_subset: index {self.max_subset} is out of range: the model of {self.ref} has "
                f"{width} outputs (0..{width - 1})"
            )
        if self.max_subset is None and len(self.label_indices) != width:
            raise BundleError(
                f"labels: without manifest.label_subset every model output needs a label: the model of {self.ref} "
                f"has {width} outputs, the labels cover 0..{len(self.label_indices) - 1}. Label every output or "
                f"set manifest.label_subset"
            )
        top = max(self.label_indices)
        if top >= width:
            raise BundleError(
                f"labels: index {top} is out of range: the model of {self.ref} has {width} outputs (0..{width - 1})"
            )

    def check_outputs(self, outputs: Any) -> None:
        shape = np.shape(outputs)
        if len(shape) != 2:
            raise BundleError(f"the model of {self.ref} returned outputs of shape {shape}; expected (batch, classes)")
        self.check_width(int(shape[1]))


@dataclasses.dataclass(frozen=True)
class _Engine:
    """Everything one model version needs to answer; swapped as a whole by reload()."""

    ref: str
    runtime: Any
    spec: PreprocessSpec
    names: tuple[str, ...]  # reported classes, in the post-processor's output order
    scientific: tuple[str | None, ...]
    output_indices: np.ndarray  # model output index of each reported class
    post: PostProcessor
    outputs: _OutputCheck
    gpu: Any = None  # a speciesclf.preprocessing.gpu.GpuPreprocessor when preprocessing runs on the runtime's GPU


class Classifier:
    """Load with :meth:`load`; predict with :meth:`predict`, :meth:`predict_batch` or :meth:`predict_iter`."""

    def __init__(self, engine: _Engine, *, batch_size: int = 64, threads: int | None = None,
                 hooks: Any = None, allow_urls: bool | UrlPolicy | Iterable[str] = False,
                 load_options: Mapping[str, Any] | None = None, thumbnails: bool | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if thumbnails not in (None, True, False):
            raise ValueError(f"thumbnails must be True, False or None (in notebooks only), got {thumbnails!r}")
        self._live_engine = engine
        self._staged = threading.local()  # reload()'s new engine, seen by its on_load hook before it goes live
        self._closed = False
        # close() waits for the batches being answered (_active) and refuses new ones; both under _state.
        self._state = threading.Condition()
        self._active = 0
        #: Keep a small thumbnail of each model input for notebook display: None (the default) does in a
        #: Jupyter kernel only, so scripts and services never pay for it.
        self.thumbnails = thumbnails
        self.batch_size = int(batch_size)
        self.threads = threads
        UrlPolicy.of(allow_urls)  # a wrong type fails here, not at the first URL
        self.allow_urls = allow_urls
        self._hooks = hooks
        self._load_options = dict(load_options or {})
        self._reload_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(_PREPROCESS_WORKERS, thread_name_prefix="speciesclf-preprocess")
        # Batch buffers are reused: a fresh 38 MB array per batch costs page faults on every image. The
        # least recently used shapes are dropped (see _release_buffer), so the pool stays bounded.
        self._free_buffers: collections.OrderedDict[tuple, list[Any]] = collections.OrderedDict()
        self._buffers_lock = threading.Lock()
        self._hook("on_load", self)

    # --- loading ------------------------------------------------------------------------------------

    @classmethod
    def load(cls, source: Any, *, device: str = "auto", backend: str = "auto", labels: Any = None,
             batch_size: int = 64, threads: int | None = None, hooks: Any = None, registry: Any = None,
             preprocess: PreprocessSpec | None = None, allow_urls: bool | UrlPolicy | Iterable[str] = False,
             runtime_options: Mapping[str, Any] | None = None, precision: str | None = None,
             gpu_preprocessing: bool | None = None, thumbnails: bool | None = None) -> Classifier:
        """Load a bundle (directory or .zip), a registry reference (``name@1.2.0``, ``name@production``,
        ``name``), a built-in model (``species100``, ``imagenet1k``) or a raw model file (.onnx, TorchScript
        .pt, torch.export .pt2) with ``labels=`` (a list, a labels file, or ``"imagenet1k"``).

        ``threads`` sets the inference runtime's and the preprocessing's thread count (torch's is
        process-wide). ``hooks`` is an object or mapping with any of ``on_load(classifier)``,
        ``before_predict(classifier, items)``, ``after_predict(classifier, predictions)``.
        ``runtime_options`` go to the inference runtime (torch: ``dtype``, ``channels_last``, ``cuda_graphs``).

        ``device="cuda"`` runs inference on the GPU and, by default, preprocessing too (nvJPEG decoding and
        the fused resize kernels of :mod:`speciesclf.preprocessing.gpu`; ``gpu_preprocessing=False`` keeps it on the CPU);
        preprocessing of the next batch overlaps inference of the current one. ``precision`` ("fp32",
        "fp16" or "bf16") sets the torch runtime's dtype and the GPU preprocessing output to match.

        ``thumbnails`` keeps a small JPEG of each model input for notebook display (``None``: in a Jupyter
        kernel only). The model is checked against ``preprocess`` (:func:`check_model_io`) before it loads.
        """
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
        runtime_options = dict(runtime_options or {})
        if precision is not None:
            if precision not in _PRECISIONS:
                raise ValueError(f"precision must be one of {sorted(_PRECISIONS)}, got {precision!r}")
            runtime_options["dtype"] = _PRECISIONS[precision]
        options = dict(device=device, backend=backend, labels=labels, threads=threads, registry=registry,
                       preprocess=preprocess, runtime_options=runtime_options, gpu_preprocessing=gpu_preprocessing)
        engine = _build_engine(source, **options)
        try:
            return cls(engine, batch_size=batch_size, threads=threads, hooks=hooks, allow_urls=allow_urls,
                       load_options=options, thumbnails=thumbnails)
        except BaseException:
            _close_engine(engine)
            raise

    def reload(self, source: Any) -> str:
        """Switch to another model version. Requests already running finish on the old one; no request
        sees a mix of the two. Returns the new ``name@version``.

        The ``on_load`` hook runs before the new version goes live; within it (on the reloading thread)
        the classifier already is the new version. If the hook raises, reload raises and the old version
        stays live."""
        self._check_open()
        options = dict(self._load_options)
        engine = _build_engine(source, **options)
        self._staged.engine = engine
        try:
            self._hook("on_load", self)
        except BaseException:
            if engine.gpu is not None:
                engine.gpu.close()
            raise
        finally:
            del self._staged.engine
        with self._reload_lock:
            self._live_engine = engine  # one reference assignment: atomic for every reader
        with self._buffers_lock:
            self._free_buffers.clear()  # the old version's buffers may not fit the new spec: drop them
        return engine.ref

    @property
    def _engine(self) -> _Engine:
        staged = getattr(self._staged, "engine", None)
        return self._live_engine if staged is None else staged

    @property
    def model(self) -> str:
        return self._engine.ref

    @property
    def labels(self) -> list[str]:
        return list(self._engine.names)

    @property
    def spec(self) -> PreprocessSpec:
        return self._engine.spec

    @property
    def device(self) -> str:
        return getattr(self._engine.runtime, "device", "cpu")

    def close(self) -> None:
        """Stops its threads (preprocessing, and the runtime's side-by-side runs); predict* and reload() then
        raise ``RuntimeError("Classifier is closed")``. Calls in progress in other threads finish the batch
        they are running and raise that for the rest. Idempotent."""
        with self._state:
            self._closed = True
            while self._active:  # the batches being answered: their runtime must stay open until done
                self._state.wait()
        self._pool.shutdown(wait=True)
        with self._buffers_lock:
            self._free_buffers.clear()
        _close_engine(self._engine)

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        runtime = getattr(self._engine.runtime, "name", type(self._engine.runtime).__name__)
        return f"Classifier({self.model!r}, {len(self._engine.names)} classes, {runtime} on {self.device})"

    # --- prediction ---------------------------------------------------------------------------------

    def predict(self, x: Any, *, top_k: int = 5, on_error: Literal["return", "raise"] = "return",
                return_logits: bool = False, return_embedding: bool = False) -> Prediction:
        """One image's :class:`Prediction`. ``return_logits`` adds the model's raw outputs (``logits``),
        ``return_embedding`` its penultimate pooled features (``embedding``) where the model declares them."""
        return self.predict_batch([x], top_k=top_k, on_error=on_error, return_logits=return_logits,
                                  return_embedding=return_embedding)[0]

    def predict_batch(self, xs: Iterable[Any], *, top_k: int = 5, on_error: Literal["return", "raise"] = "return",
                      return_logits: bool = False, return_embedding: bool = False) -> Predictions:
        """A :class:`Prediction` per image, in order, as a :class:`Predictions` list (a grid in notebooks)."""
        self._check_open()
        if isinstance(xs, (str, bytes, bytearray, memoryview, os.PathLike)):
            # Iterating one of these would classify each character or byte.
            raise TypeError(f"predict_batch takes an iterable of images, got one {type(xs).__name__} "
                            f"(str, bytes, bytearray, memoryview and paths are single images: use predict())")
        _check_predict_args(top_k, on_error)
        extras = self._check_extras(return_logits, return_embedding)
        top_k = int(top_k)
        items = list(xs)
        self._hook("before_predict", self, items)
        predictions = Predictions(self._predict_stream(items, top_k=top_k, on_error=on_error,
                                                       batch_size=self.batch_size, extras=extras))
        self._hook("after_predict", self, predictions)
        return predictions

    def predict_iter(self, iterable: Iterable[Any], *, batch_size: int | None = None, top_k: int = 5,
                     progress: bool = False, on_error: Literal["return", "raise"] = "return",
                     return_logits: bool = False, return_embedding: bool = False) -> Iterator[Prediction]:
        """Predictions in input order, batch by batch; decoding of the next batch overlaps inference.

        ``progress=True`` shows a tqdm bar on stderr (rate, and the ETA when ``iterable`` has a length).
        Arguments are checked when called, not when first iterated. If ``iterable`` raises, the predictions
        of every item it produced before are yielded first, then its exception is raised."""
        self._check_open()
        if batch_size is None:
            batch_size = self.batch_size
        elif isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        elif batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_predict_args(top_k, on_error)
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        extras = self._check_extras(return_logits, return_embedding)
        batch_size, top_k = int(batch_size), int(top_k)
        return self._predict_iter(iterable, batch_size=batch_size, top_k=top_k, progress=progress,
                                  on_error=on_error, extras=extras)

    def _predict_iter(self, iterable: Iterable[Any], *, batch_size: int, top_k: int, progress: bool,
                      on_error: str, extras: _Extras) -> Iterator[Prediction]:
        total = None
        if progress:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:  # a generator: the bar counts and gives the rate, without an ETA
                total = None
        stream = self._predict_stream(iterable, top_k=top_k, on_error=on_error, batch_size=batch_size,
                                      hooks_per_batch=True, extras=extras)
        if not progress:
            yield from stream
            return
        from tqdm import tqdm

        with tqdm(total=total, unit="img", desc=self.model, file=sys.stderr, dynamic_ncols=True) as bar:
            for prediction in stream:
                bar.update(1)
                yield prediction

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("Classifier is closed")

    def _check_extras(self, return_logits: Any, return_embedding: Any) -> _Extras:
        for name, value in (("return_logits", return_logits), ("return_embedding", return_embedding)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, got {value!r}")
        runtime = self._engine.runtime
        # A plugin runtime offers an embedding by having run_with_embedding(); the built-in ones say so.
        has_embedding = getattr(runtime, "has_embedding", callable(getattr(runtime, "run_with_embedding", None)))
        if return_embedding and not has_embedding:
            raise ValueError(f"{self.model} declares no embedding output: a bundle names one in "
                             f"manifest.embedding_output (the built-in models have one, with the onnx package "
                             f"installed: pip install 'speciesclf[onnx]')")
        return _Extras(logits=return_logits, embedding=return_embedding)

    def _begin_batch(self) -> None:
        with self._state:
            if self._closed:
                raise RuntimeError("Classifier is closed")
            self._active += 1

    def _end_batch(self) -> None:
        with self._state:
            self._active -= 1
            if not self._active:
                self._state.notify_all()

    def _predict_stream(self, iterable: Iterable[Any], *, top_k: int, on_error: str, batch_size: int,
                        hooks_per_batch: bool = False, extras: _Extras | None = None) -> Iterator[Prediction]:
        self._check_open()  # again: a predict_iter generator may first run after close()
        engine = self._engine  # one version for the whole request
        # Every buffer has the rows of a full batch: a shorter tail reuses it instead of adding a shape.
        rows = max(batch_size, self.batch_size)
        chunks = _chunks(iterable, batch_size)
        failure: Exception | None = None  # what the iterable raised, re-raised once earlier items are answered
        thumbnails = bool(self.thumbnails or (self.thumbnails is None and _in_notebook()))

        def submit_next():
            nonlocal failure
            try:
                chunk = next(chunks, None)
            except Exception as e:
                failure, chunk = e, None
            if chunk is None:
                return None
            with self._state:  # close() shuts the pool down under this lock: never submit to a closed one
                if self._closed:
                    raise RuntimeError("Classifier is closed")
                return self._pool.submit(self._prepare, engine, chunk, rows, thumbnails)

        pending = submit_next()
        while pending is not None:
            prepared = pending.result()
            pending = submit_next()  # prepared while this batch runs
            if hooks_per_batch:  # a stream has no whole to show the hooks: each batch is shown instead
                self._hook("before_predict", self, prepared["items"])
            self._begin_batch()
            try:
                predictions = self._infer(engine, prepared, top_k, extras or _NO_EXTRAS)
            finally:
                self._release_buffer(prepared["buffer"])
                self._end_batch()
            if hooks_per_batch:
                self._hook("after_predict", self, predictions)
            for prediction in predictions:
                if on_error == "raise" and prediction.error is not None:
                    raise prediction.error
                yield prediction
        if failure is not None:
            raise failure

    def _prepare(self, engine: _Engine, items: list[Any], rows: int, thumbnails: bool = False) -> dict:
        start = time.perf_counter()
        sources, errors = [], {}
        for i, item in enumerate(items):
            try:
                sources.append(to_image_source(item, max_bytes=engine.spec.max_bytes,
                                               max_pixels=engine.spec.max_pixels, allow_urls=self.allow_urls))
            except ImageError as e:
                errors[i] = e
                sources.append(b"")  # its slot is reported with the error above
        buffer = self._acquire_buffer(engine, rows)
        # out= may have more rows than items: the batch is a view of the first len(items).
        if engine.gpu is not None:
            # Our own idle buffer: no need to wait for the model's queued work, which this overlaps.
            batch = engine.gpu(sources, out=buffer[1], on_error="skip", wait_for_torch=False)
        else:
            batch = preprocess_batch(sources, engine.spec, threads=self.threads, on_error="skip", timings=True,
                                     out=buffer[1])
        for i, error in batch.errors.items():
            errors.setdefault(i, error)
        # A caught error's traceback holds the frames it passed, and their locals hold the whole batch of
        # inputs: kept on a prediction, it would keep them all alive. The message says what went wrong.
        errors = {i: error.with_traceback(None) for i, error in errors.items()}
        prepared = {"items": items, "batch": batch, "errors": errors, "seconds": time.perf_counter() - start,
                    "buffer": buffer, "thumbnails_wanted": thumbnails}
        if thumbnails and engine.gpu is None:  # here, on the preparing thread, they overlap inference
            prepared["thumbnails"] = _thumbnails(batch.array, [int(i) for i in np.flatnonzero(batch.ok)], engine.spec)
        return prepared

    def _acquire_buffer(self, engine: _Engine, rows: int) -> tuple[tuple, Any]:
        """(key, batch buffer of ``rows`` rows): a NumPy array, or a CUDA tensor for GPU preprocessing."""
        spec = engine.gpu.spec if engine.gpu is not None else engine.spec
        shape = spec.output_shape(rows)
        key = (shape, spec.dtype, None if engine.gpu is None else str(engine.gpu.device))
        with self._buffers_lock:
            free = self._free_buffers.get(key)
            if free:
                return key, free.pop()
        if engine.gpu is None:
            return key, np.empty(shape, dtype=spec.numpy_dtype)
        import torch

        buffer = torch.empty(shape, dtype=getattr(torch, spec.dtype), device=engine.gpu.device)
        # The allocator may hand back memory that queued kernels still use; once idle, a pooled buffer
        # stays idle between its uses (each batch's predictions are read back before it is released).
        torch.cuda.synchronize(engine.gpu.device)
        return key, buffer

    def _release_buffer(self, key_and_buffer: tuple[tuple, Any]) -> None:
        key, buffer = key_and_buffer
        with self._buffers_lock:
            if self._closed:
                return
            free = self._free_buffers.setdefault(key, [])
            self._free_buffers.move_to_end(key)
            if len(free) < 2:  # one being filled, one being read: enough for the pipeline
                free.append(buffer)
            while len(self._free_buffers) > _POOLED_SHAPES:  # other batch sizes: the least recently used go
                self._free_buffers.popitem(last=False)

    def _infer(self, engine: _Engine, prepared: dict, top_k: int, extras: _Extras) -> list[Prediction]:
        items, batch, errors = prepared["items"], prepared["batch"], prepared["errors"]
        good = np.flatnonzero(batch.ok)
        start = time.perf_counter()
        # All good: the batch goes to the runtime as it is (no copy); otherwise only the good rows.
        inputs = batch.array if len(good) == len(items) else batch.array[good]
        scores = outputs = embeddings = None
        if len(good):
            try:
                if extras.embedding:
                    outputs, embeddings = engine.runtime.run_with_embedding(inputs)
                else:
                    outputs = engine.runtime.run(inputs)
            except (GpuError, ModelRuntimeError):
                raise
            except Exception as e:  # the runtime's own types (onnxruntime's Fail, InvalidArgument, torch's ...)
                raise ModelRuntimeError(f"{engine.ref}: the model's runtime failed on a batch of {len(good)} "
                                        f"image(s): {type(e).__name__}: {e}") from e
            if embeddings is not None:
                embeddings = np.asarray(embeddings).reshape(len(good), -1)
            engine.outputs.check_outputs(outputs)  # a model whose width the runtime could not tell at load
            scores = engine.post(outputs)
        inference_ms = (time.perf_counter() - start) * 1000 / max(len(good), 1)
        thumbnails: dict[int, bytes] = prepared.get("thumbnails", {})
        if prepared["thumbnails_wanted"] and engine.gpu is not None:  # the batch is on the GPU: read it back once
            thumbnails = _thumbnails(batch.array, [int(i) for i in good], engine.gpu.spec)
        preprocess_ms = prepared["seconds"] * 1000 / max(len(items), 1)
        k = min(top_k, len(engine.names))
        predictions: list[Prediction] = []
        row_of = {int(slot): row for row, slot in enumerate(good)}
        for i, item in enumerate(items):
            # GPU preprocessing times the batch as a whole: its decoding is part of preprocess_ms.
            decode_ms = float(batch.seconds[i, 0]) * 1000 if batch.seconds is not None else 0.0
            timings = {"decode_ms": decode_ms, "preprocess_ms": preprocess_ms, "inference_ms": 0.0}
            thumbnail = thumbnails.get(i)
            if i in errors:
                predictions.append(Prediction(None, None, None, [], False, engine.ref, timings, errors[i]))
                continue
            row = row_of[i]
            if not scores.finite[row]:  # NaN scores would still sort into some label: never report one
                error = ModelOutputError(f"the model's scores for this image are not finite (NaN or infinity); "
                                         f"the model {engine.ref} or its runtime is broken")
                predictions.append(Prediction(None, None, None, [], False, engine.ref, timings, error,
                                              _thumbnail=thumbnail))
                continue
            probabilities = scores.probabilities[row]
            order = top_k_indices(probabilities, k)
            best = int(order[0])
            timings["inference_ms"] = inference_ms
            unknown = bool(scores.unknown[row])
            predictions.append(Prediction(
                label=None if unknown else engine.names[best],
                score=float(probabilities[best]),
                index=int(engine.output_indices[best]),
                top_k=[(engine.names[j], float(probabilities[j])) for j in order],
                unknown=unknown,
                model=engine.ref,
                timings=timings,
                scientific_name=None if unknown else engine.scientific[best],
                guess=engine.names[best],
                open_set_score=float(scores.evidence[row]),
                # Copies: a view would keep the whole batch's array alive as long as one prediction.
                logits=np.array(outputs[row], dtype=np.float32) if extras.logits else None,
                embedding=np.array(embeddings[row], dtype=np.float32) if embeddings is not None else None,
                _thumbnail=thumbnail,
            ))
        return predictions

    def _hook(self, name: str, *args: Any) -> None:
        hooks = self._hooks
        if hooks is None:
            return
        fn = hooks.get(name) if isinstance(hooks, Mapping) else getattr(hooks, name, None)
        if fn is not None:
            fn(*args)


@dataclasses.dataclass(frozen=True)
class _Extras:
    """What a request asks for beyond the prediction itself."""

    logits: bool = False
    embedding: bool = False


_NO_EXTRAS = _Extras()

# Threads that prepare (read, decode, preprocess) batches, shared by every caller of one Classifier; each
# batch is itself preprocessed on `threads` native threads. See docs/classifier.md for the measurement.
_PREPROCESS_WORKERS = 1

_POOLED_SHAPES = 2  # buffer shapes kept for reuse: the classifier's batch size and one other


def _check_predict_args(top_k: Any, on_error: Any) -> None:
    # bool is an int, but top_k=True is a mistake; NumPy integers are fine.
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if on_error not in ("return", "raise"):
        raise ValueError(f"on_error must be 'return' or 'raise', got {on_error!r}")


def _chunks(iterable: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    try:
        for item in iterable:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except Exception:
        if chunk:  # the items produced before the failure are still answered; the next call re-raises
            yield chunk
        raise
    if chunk:
        yield chunk


# --- building an engine ---------------------------------------------------------------------------------

_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _build_engine(source: Any, *, gpu_preprocessing: bool | None = None, threads: int | None = None,
                  **options: Any) -> _Engine:
    engine = _build_runtime_engine(source, threads=threads, **options)
    try:
        engine = _with_gpu_preprocessing(engine, gpu_preprocessing=gpu_preprocessing, threads=threads)
        # Against what the runtime will be fed: GPU preprocessing produces the runtime's own dtype.
        check_model_io(engine.runtime, engine.gpu.spec if engine.gpu is not None else engine.spec,
                       outputs=engine.outputs)
    except BaseException:
        _close_engine(engine)
        raise
    return engine


def _close_engine(engine: _Engine) -> None:
    if engine.gpu is not None:
        engine.gpu.close()
    close_runtime = getattr(engine.runtime, "close", None)
    if callable(close_runtime):
        close_runtime()


def check_model_io(runtime: Any, spec: PreprocessSpec, manifest: Any = None, labels: Any = None, *,
                   outputs: _OutputCheck | None = None) -> None:
    """Check a loaded runtime's model against what will be fed to it and read from it; raise at the first
    mismatch, naming both sides. ``Classifier.load`` runs it on every model; ``bundle verify`` may too.

    Input: the declared input (``runtime.input_signature``: ONNX models, torch.export programs) must have
    rank 4, 3 channels where ``spec.layout`` puts them, the spec's image size where the model fixes one and
    (ONNX) the spec's dtype: else :class:`~speciesclf.model.runtimes.ModelInputError`. A TorchScript model
    declares nothing: one image of the spec's shape is run through it instead (a "probe"), and its failure
    is the error. Plugin runtimes without an ``input_signature`` are not checked.

    Output: with ``manifest`` (and ``labels``, a bundle's Label list), the model's output width where the
    runtime knows it (or the probe showed it) must agree with ``manifest.num_outputs``, the label subset
    and the labels: else :class:`~speciesclf.BundleError`.
    """
    from .runtimes import ModelInputError
    from .runtimes.torch_runtime import TorchRuntime

    if outputs is None and manifest is not None:
        # Without labels, the manifest's own figures stand in for them (nothing to check when it has none).
        if labels:
            indices = tuple(label.index for label in labels)
        elif manifest.label_subset is not None:
            indices = tuple(manifest.label_subset)
        else:
            indices = tuple(range(manifest.num_outputs)) if manifest.num_outputs else ()
        if indices:
            outputs = _OutputCheck(ref=manifest.ref, num_outputs=manifest.num_outputs, label_indices=indices,
                                   max_subset=None if manifest.label_subset is None else max(manifest.label_subset))
            outputs.check_labels()
    what = f"{outputs.ref}: " if outputs is not None else ""
    expected = _spec_input(spec)
    declared = getattr(runtime, "input_signature", None)
    if declared is not None:
        problem = _input_mismatch(declared, spec)
        if problem:
            raise ModelInputError(f"{what}the model's input {declared.describe()}{_layout_hint(declared)} does not "
                                  f"fit the preprocessing spec, which gives {expected}: {problem}")
    elif isinstance(runtime, TorchRuntime):
        probe = np.zeros(spec.output_shape(1), dtype=spec.numpy_dtype)
        try:
            result = runtime.run(probe)
        except Exception as e:  # whatever the model raises on an input it cannot take
            raise ModelInputError(f"{what}the model does not take the input the preprocessing spec gives, "
                                  f"{expected}: one such image run at load failed: {_last_line(e)}") from e
        if outputs is not None:
            outputs.check_outputs(result)
    if outputs is not None:
        _check_static_width(runtime, outputs)


def _spec_input(spec: PreprocessSpec) -> str:
    dims = ", ".join("N" if i == 0 else str(d) for i, d in enumerate(spec.output_shape(0)))
    return f"{spec.dtype} [{dims}] ({spec.layout}, size {spec.size})"


def _input_mismatch(declared: Any, spec: PreprocessSpec) -> str:
    shape = declared.shape
    if shape is None:  # no shape declared: only the dtype can be checked
        return (f"the model takes {declared.dtype}, the spec gives {spec.dtype}"
                if declared.dtype is not None and declared.dtype != spec.dtype else "")
    if len(shape) != 4:
        return f"the model takes rank-{len(shape)} input, the spec gives rank 4 (batch, image)"
    wanted = spec.output_shape(0)
    problems = []
    channel_axis = 1 if spec.layout == "NCHW" else 3
    if shape[channel_axis] not in (None, 3):
        problems.append(f"axis {channel_axis} (the channels in {spec.layout}) is {shape[channel_axis]}, not 3")
    for axis in (1, 2, 3):
        if axis != channel_axis and shape[axis] is not None and shape[axis] != wanted[axis]:
            problems.append(f"axis {axis} is {shape[axis]}, the spec's is {wanted[axis]}")
    if declared.dtype is not None and declared.dtype != spec.dtype:
        problems.append(f"the model takes {declared.dtype}, the spec gives {spec.dtype}")
    return "; ".join(problems)


def _layout_hint(declared: Any) -> str:
    shape = declared.shape or ()
    if len(shape) == 4 and shape[1] == 3 and shape[3] != 3:
        return " (channels first: NCHW)"
    if len(shape) == 4 and shape[3] == 3 and shape[1] != 3:
        return " (channels last: NHWC)"
    return ""


def _last_line(error: BaseException) -> str:
    # The last line says what went wrong: TorchScript's first ones only say where.
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:400]


def _with_gpu_preprocessing(engine: _Engine, *, gpu_preprocessing: bool | None, threads: int | None) -> _Engine:
    on_gpu = str(getattr(engine.runtime, "device", "cpu")).startswith("cuda")
    if gpu_preprocessing and not on_gpu:
        raise ValueError("gpu_preprocessing=True needs the model on a GPU (device='cuda')")
    if not on_gpu or gpu_preprocessing is False:
        return engine
    from ..preprocessing.gpu import GpuPreprocessor, cuda_status

    usable, why = cuda_status()
    if not usable:
        if gpu_preprocessing:
            from ..errors import CudaUnavailableError

            raise CudaUnavailableError(f"GPU preprocessing is not available: {why}")
        return engine  # the CPU preprocesses; the runtime copies each batch to its GPU
    spec = engine.spec
    if spec.dtype != "uint8":
        spec = dataclasses.replace(spec, dtype=getattr(engine.runtime, "input_dtype", "float32"))
    gpu = GpuPreprocessor(spec, engine.runtime.device, threads=threads)
    return dataclasses.replace(engine, gpu=gpu)


def _build_runtime_engine(source: Any, *, device: str, backend: str, labels: Any, threads: int | None,
                          registry: Any, preprocess: PreprocessSpec | None, runtime_options: dict[str, Any]) -> _Engine:
    from ..bundles.bundle import Bundle

    runtime = dict(device=device, backend=backend, threads=threads, options=runtime_options)
    if isinstance(source, Bundle):
        return _engine_from_bundle(source, **runtime)
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.fspath(source))
        if path.exists():
            if path.is_dir() or path.suffix.lower() == ".zip":
                # Not verified here: _engine_from_bundle checks the sha256 of the very bytes it loads.
                return _engine_from_bundle(Bundle.open(path, verify=False), **runtime)
            if labels is None:
                raise ValueError(f"{path.name}: a raw model file needs labels= (a list, a file or 'imagenet1k')")
            return _engine_from_file(path, labels=labels, preprocess=preprocess or PreprocessSpec(), **runtime)
        if path.suffix.lower() in _MODEL_SUFFIXES + (".zip",):
            raise FileNotFoundError(f"no such model file: {path}")
        return _engine_from_bundle(_resolve_reference(str(source), registry), **runtime)
    raise TypeError(f"cannot load a model from {type(source).__name__}")


def _resolve_reference(ref: str, registry: Any):
    from . import builtin
    from ..bundles.registry import Registry, RegistryError

    registry = registry if registry is not None else Registry()
    name = ref.split("@", 1)[0]
    if name in registry.names():
        return registry.open(ref, verify=False)  # the engine verifies the bytes it loads
    if name in builtin.BUILTIN_MODELS:
        return builtin.builtin_bundle(ref)
    raise RegistryError(f"no model {ref!r}: not in the registry ({registry.root}) and not built in "
                        f"({', '.join(sorted(builtin.BUILTIN_MODELS))})")


def _engine_from_bundle(bundle: Any, *, device: str, backend: str, threads: int | None,
                        options: dict[str, Any]) -> _Engine:
    m = bundle.manifest
    by_index = {label.index: label for label in bundle.labels}
    check = _OutputCheck(ref=f"{m.name}@{m.version}", num_outputs=m.num_outputs, label_indices=tuple(by_index),
                         max_subset=None if m.label_subset is None else max(m.label_subset))
    check.check_labels()
    # The bytes are hashed and loaded from one read: checking the path and letting the runtime reopen it
    # would load whatever replaced the file in between (plugin runtimes get a private copy of those bytes).
    runtime = load_runtime(bundle.model_path, m.framework, backend=backend, device=device, threads=threads,
                           options=options, data=bundle.read_model(), embedding_output=m.embedding_output)
    if m.embedding_output is not None and not callable(getattr(runtime, "run_with_embedding", None)):
        raise BundleError(f"manifest.embedding_output: {m.ref} names one, but its {m.framework} runtime "
                          f"offers no run_with_embedding()")
    indices = list(m.label_subset) if m.label_subset is not None else sorted(by_index)
    chosen = [by_index[i] for i in indices]
    post = PostProcessor(
        output_kind=m.output_kind,
        temperature=m.temperature,
        label_subset=m.label_subset,
        unknown_method=m.unknown.method if m.unknown else None,
        unknown_threshold=m.unknown.threshold if m.unknown else None,
    )
    return _Engine(ref=f"{m.name}@{m.version}", runtime=runtime, spec=m.preprocess,
                   names=tuple(label.name for label in chosen),
                   scientific=tuple(label.scientific_name for label in chosen),
                   output_indices=np.asarray(indices, dtype=np.intp), post=post, outputs=check)


def _check_static_width(runtime: Any, check: _OutputCheck) -> None:
    """Check the output width now when the runtime knows it without a run (ONNX models with a fixed shape)."""
    width = getattr(runtime, "output_width", None)
    if isinstance(width, int) and not isinstance(width, bool) and width > 0:
        check.check_width(width)


def _engine_from_file(path: Path, *, labels: Any, preprocess: PreprocessSpec, device: str, backend: str,
                      threads: int | None, options: dict[str, Any]) -> _Engine:
    from ..bundles.bundle import Label, read_labels

    if isinstance(labels, str) and labels == "imagenet1k":
        from .builtin import imagenet_labels

        label_list = imagenet_labels()
    elif isinstance(labels, (str, os.PathLike)):
        label_list = _labels_from_file(Path(labels), read_labels)
    elif isinstance(labels, Sequence):
        label_list = [Label(i, str(name)) for i, name in enumerate(labels)]
    else:
        raise TypeError("labels= must be a list of names, a labels file or 'imagenet1k'")
    if not label_list:
        raise ValueError("labels: at least one label is needed")
    by_index = {label.index: label for label in label_list}
    if len(by_index) != len(label_list):
        raise ValueError("labels: duplicate indices")
    label_list = [by_index[i] for i in sorted(by_index)]  # column order, as for bundles
    check = _OutputCheck(ref=f"{path.stem}@0.0.0", num_outputs=None, label_indices=tuple(by_index), max_subset=None)
    check.check_labels()
    runtime = load_runtime(path, framework_for_file(path), backend=backend, device=device, threads=threads,
                           options=options)
    return _Engine(ref=f"{path.stem}@0.0.0", runtime=runtime, spec=preprocess,
                   names=tuple(label.name for label in label_list),
                   scientific=tuple(label.scientific_name for label in label_list),
                   output_indices=np.asarray([label.index for label in label_list], dtype=np.intp),
                   post=PostProcessor(output_kind="logits"), outputs=check)


def _labels_from_file(path: Path, read_labels: Callable) -> list:
    """A labels TSV (index, name, scientific_name) or a plain text file with one name per line."""
    from ..bundles.bundle import Label

    text = path.read_text(encoding="utf-8")
    if text.startswith("index\t"):
        return read_labels(path)
    # "\n" only: str.splitlines() also splits at \x85, \u2028... inside a name, shifting every later index.
    return [Label(i, line.strip()) for i, line in enumerate(text.split("\n")) if line.strip()]

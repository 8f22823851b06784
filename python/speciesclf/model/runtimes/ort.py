"""ONNX Runtime: the CPU provider everywhere, CUDA's when present and asked for."""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

__all__ = ["OnnxRuntime"]

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
              "tensor(double)": "float64", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}

# A second session holds a second copy of the weights: beyond this size, parallel runs are only made on request.
_PARALLEL_RUNS_MAX_MODEL_BYTES = 256 * 2**20


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None,
                 allow_spinning: bool = True, dtype: str = "float32", run_batch: int | None = None,
                 parallel_runs: bool | None = None, data: bytes | None = None,
                 embedding_output: str | None = None):
        if dtype != "float32":
            raise ValueError(f"precision {dtype!r} is for torch models: an ONNX model runs in the precision it was "
                             "exported with")
        try:
            import onnxruntime as ort
        except ImportError as e:  # an optional dependency
            raise ImportError("ONNX models need onnxruntime: pip install 'speciesclf[onnx]'") from e
        available = ort.get_available_providers()
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
        wants_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        if wants_cuda and "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"device={device!r} but onnxruntime has no CUDA provider (it has {available})")
        providers: list = ["CPUExecutionProvider"]
        if wants_cuda:
            device_id = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        if not allow_spinning:
            # Idle intra-op threads otherwise busy-wait for the next op; where other threads of the process
            # (an HTTP event loop, image decoding) need the same cores, that spinning takes CPU from them.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if data is not None:
            # Loaded from memory, the model's external data files (if any) are still found next to it.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                             str(Path(path).parent))
        try:
            self.session = ort.InferenceSession(str(path) if data is None else data, sess_options=options,
                                                providers=providers)
        except Exception as e:  # InvalidProtobuf, Fail, NoSuchFile...: none of them a common base but Exception
            from . import ModelLoadError

            raise ModelLoadError(f"{Path(path).name}: onnxruntime cannot load the model: {e}") from e
        self.device = "cuda" if wants_cuda else "cpu"
        # On the CPU, time per image grows once a run's activations outgrow the caches (MobileNetV2 int8 on
        # 2 cores: 0.84 ms/img at 8 images per run, 1.20 at 64), so large batches run in slices of this
        # many images; a GPU takes the whole batch. 0 never slices.
        if run_batch is not None and run_batch < 0:
            raise ValueError(f"run_batch must be >= 0, got {run_batch}")
        self.run_batch = (0 if wants_cuda else 8) if run_batch is None else int(run_batch)
        # On the CPU a batch of several images runs as parts side by side, each on one thread of a session of
        # its own: single-threaded runs never wait for each other between ops, as one session's intra-op
        # threads do at every op (MobileNetV2 int8, 2 cores, batches of 64 from JPEG bytes: +6% end to end;
        # 16-image batches in the HTTP service: +3%). A single image still runs on all threads, for latency.
        if parallel_runs not in (None, True, False):
            raise ValueError(f"parallel_runs must be True, False or None (auto), got {parallel_runs!r}")
        self.lanes = int(threads) if threads else _usable_cores()
        if parallel_runs is None:
            size = len(data) if data is not None else _file_size(path)
            parallel_runs = size is not None and size <= _PARALLEL_RUNS_MAX_MODEL_BYTES
        self._single_thread = None
        if parallel_runs and not wants_cuda and self.lanes > 1:
            single = ort.SessionOptions()
            single.intra_op_num_threads = 1
            single.inter_op_num_threads = 1
            if data is not None:
                single.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                str(Path(path).parent))
            self._single_thread = ort.InferenceSession(str(path) if data is None else data, sess_options=single,
                                                       providers=["CPUExecutionProvider"])
        self._lane_pool: ThreadPoolExecutor | None = None
        self._lane_pool_pid = 0
        self._lane_lock = threading.Lock()
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            from . import ModelInputError

            names = ", ".join(repr(i.name) for i in inputs)
            raise ModelInputError(f"{Path(path).name}: the model has {len(inputs)} inputs ({names}); speciesclf feeds "
                                  "one image input (a batch of preprocessed images): export the model with one input")
        (model_input,) = inputs
        self.input_name = model_input.name
        self.input_shape = model_input.shape
        # A model exported with a fixed batch size (torch.onnx.export without dynamic axes: often 1) only takes
        # batches of exactly that size: larger batches run in parts of it, a short last part padded.
        first = self.input_shape[0] if self.input_shape else None
        self.fixed_batch = first if isinstance(first, int) and not isinstance(first, bool) and first > 0 else None
        outputs = [output.name for output in self.session.get_outputs()]
        if embedding_output is not None and embedding_output not in outputs:
            from ...bundles.bundle import BundleError

            raise BundleError(f"manifest.embedding_output: {embedding_output!r} is not an output of "
                              f"{Path(path).name} (its outputs: {', '.join(map(repr, outputs))})")
        # The scores are the first output that is not the embedding (models with an added embedding output
        # keep their scores first).
        self.output_name = next(name for name in outputs if name != embedding_output)
        self.embedding_name = embedding_output
        self.has_embedding = embedding_output is not None

    @property
    def output_width(self) -> int | None:
        """The model's number of outputs per image when its output shape fixes it, else None."""
        shape = next(o for o in self.session.get_outputs() if o.name == self.output_name).shape
        width = shape[-1] if len(shape) == 2 else None
        return width if isinstance(width, int) and width > 0 else None

    @property
    def input_signature(self):
        """The model's declared input (its name, shape and dtype), a :class:`~speciesclf.model.runtimes.ModelInput`."""
        from . import ModelInput

        model_input = self.session.get_inputs()[0]
        # onnxruntime gives [] for an input whose shape the model leaves undeclared (any rank): nothing to check.
        shape = tuple(d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None
                      for d in model_input.shape) if model_input.shape else None
        kind = model_input.type
        dtype = _ORT_TYPES.get(kind, kind.removeprefix("tensor(").removesuffix(")"))
        return ModelInput(model_input.name, shape, dtype)

    @property
    def input_dtype(self) -> str:
        """The dtype name GPU preprocessing should produce for this model's input."""
        return "float16" if self.session.get_inputs()[0].type == "tensor(float16)" else "float32"

    def run(self, batch) -> np.ndarray:
        return self._run(batch, [self.output_name])[0]

    def run_with_embedding(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(scores, embeddings): the embedding output is fetched only when asked for."""
        if self.embedding_name is None:
            raise ValueError("this model declares no embedding output")
        scores, embeddings = self._run(batch, [self.output_name, self.embedding_name])
        return scores, embeddings

    def _run(self, batch, names: list[str]) -> list[np.ndarray]:
        if not isinstance(batch, np.ndarray):  # a torch tensor, from GPU preprocessing
            if self.device == "cuda" and batch.is_cuda:
                return self._run_on_device_in_parts(batch, names)
            batch = batch.detach().cpu().numpy()
        n = len(batch)
        if n == 0:
            return [out[:0] for out in self._run_slice(_padded(batch, self.fixed_batch or 0), names)]
        step = self._part_size(n)
        parts = [batch[i:i + step] for i in range(0, n, step)]
        if self.fixed_batch:
            parts = [_padded(part, self.fixed_batch) for part in parts]
        if len(parts) == 1:
            outputs = [self._run_slice(parts[0], names)]
        elif self._single_thread is not None:
            # Side by side on the single-threaded session, one part per lane at a time, in input order.
            def run_part(part: np.ndarray) -> list[np.ndarray]:
                return self._run_slice(part, names, self._single_thread)

            try:
                outputs = list(self._pool().map(run_part, parts))
            except RuntimeError as e:  # "cannot schedule new futures": closed, or the interpreter is exiting
                if "schedule" not in str(e):
                    raise
                outputs = [run_part(part) for part in parts]
        else:
            outputs = [self._run_slice(part, names) for part in parts]
        results = []
        for k in range(len(names)):
            result = outputs[0][k] if len(outputs) == 1 else np.concatenate([out[k] for out in outputs])
            results.append(result[:n] if self.fixed_batch else result)
        return results

    def _part_size(self, n: int) -> int:
        """Images per run: a fixed batch dimension's size; else at most run_batch, and with side-by-side runs
        small enough that every lane gets a part."""
        if self.fixed_batch:
            return self.fixed_batch
        step = self.run_batch or n
        if self._single_thread is not None:
            step = min(step, math.ceil(n / self.lanes))
        return max(1, step)

    def _run_slice(self, batch: np.ndarray, names: list[str], session: object = None) -> list[np.ndarray]:
        session = self.session if session is None else session
        return session.run(names, {self.input_name: np.ascontiguousarray(batch)})

    def close(self) -> None:
        """Stops the side-by-side threads (a later run still works: in this thread, or on a new pool)."""
        with self._lane_lock:
            pool, self._lane_pool = self._lane_pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _pool(self) -> ThreadPoolExecutor:
        # Made on first use, and again in a forked child, whose copy of the pool has no threads behind it.
        with self._lane_lock:
            if self._lane_pool is None or self._lane_pool_pid != os.getpid():
                self._lane_pool = ThreadPoolExecutor(self.lanes, thread_name_prefix="speciesclf-onnx-lane")
                self._lane_pool_pid = os.getpid()
            return self._lane_pool

    def _run_on_device_in_parts(self, batch, names: list[str]) -> list[np.ndarray]:
        k, n = self.fixed_batch, len(batch)
        if not k or n == k:
            return self._run_on_device(batch, names)
        if n == 0:
            return [out[:0] for out in self._run_on_device(batch.new_zeros((k, *batch.shape[1:])), names)]
        import torch

        outputs = []
        for i in range(0, n, k):
            part = batch[i:i + k]
            if len(part) < k:
                part = torch.cat([part, part.new_zeros((k - len(part), *part.shape[1:]))])
            outputs.append(self._run_on_device(part, names))
        return [np.concatenate([out[j] for out in outputs])[:n] for j in range(len(names))]

    def _run_on_device(self, batch, names: list[str]) -> list[np.ndarray]:
        # The CUDA provider reads the batch where GPU preprocessing left it: no round trip through the host.
        batch = batch.contiguous()
        binding = self.session.io_binding()
        element = np.float16 if str(batch.dtype) == "torch.float16" else np.float32
        binding.bind_input(self.input_name, "cuda", batch.device.index or 0, element, tuple(batch.shape),
                           batch.data_ptr())
        for name in names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())


def _file_size(path: str | Path) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None


def _usable_cores() -> int:
    # The cores this process may run on (a container's CPU set), not every core of the host.
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _padded(part: np.ndarray, size: int) -> np.ndarray:
    if len(part) >= size:
        return part
    padding = np.zeros((size - len(part), *part.shape[1:]), dtype=part.dtype)
    return np.concatenate([part, padding])

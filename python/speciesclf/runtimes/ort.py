"""ONNX Runtime: the CPU provider everywhere, CUDA's when present and asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["OnnxRuntime"]


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "auto", threads: int | None = None):
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
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.device = "cuda" if wants_cuda else "cpu"
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        self.input_shape = model_input.shape
        self.output_name = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(batch)})[0]

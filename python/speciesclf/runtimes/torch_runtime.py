"""torch: TorchScript (.pt) and torch.export ExportedProgram (.pt2) models."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["TorchRuntime"]


class TorchRuntime:
    name = "torch"

    def __init__(self, path: str | Path, *, framework: str, device: str = "auto", threads: int | None = None,
                 dtype: str = "float32", channels_last: bool = False):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device={device!r} but torch sees no CUDA device")
        self.device = device
        self.dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
        if self.dtype != torch.float32 and not device.startswith("cuda"):
            raise ValueError(f"{dtype} inference is for GPUs; use float32 on the CPU")
        if threads:
            torch.set_num_threads(int(threads))  # process-wide in torch: documented on Classifier.load
        if framework == "torchscript":
            module = torch.jit.load(str(path), map_location=device)
            module.eval()
        elif framework == "torch-export":
            # An ExportedProgram was traced in the mode it was exported in; its module has no eval().
            module = torch.export.load(str(path)).module().to(device)
        else:
            raise ValueError(f"TorchRuntime loads torchscript or torch-export models, not {framework!r}")
        self.channels_last = channels_last
        self.module = module
        self._torch = torch

    def run(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = self.module(x)
            if isinstance(y, (tuple, list)):
                y = y[0]
            return y.float().cpu().numpy()

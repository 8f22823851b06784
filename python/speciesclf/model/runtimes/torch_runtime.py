"""torch: TorchScript (.pt) and torch.export ExportedProgram (.pt2) models."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ...bundles.bundle import BundleError

__all__ = ["TorchRuntime"]


class TorchRuntime:
    """``run`` takes a NumPy batch or a torch tensor (a CUDA tensor from GPU preprocessing stays on the GPU).

    ``cuda_graphs=True`` (CUDA only) captures the model once per batch shape and replays the graph, which
    removes the per-layer launch cost; at most ``max_graphs`` shapes are kept.
    """

    name = "torch"

    def __init__(self, path: str | Path, *, framework: str, device: str = "auto", threads: int | None = None,
                 dtype: str = "float32", channels_last: bool = False, cuda_graphs: bool = False,
                 max_graphs: int = 8, data: bytes | None = None, embedding_output: str | None = None):
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
        if framework not in ("torchscript", "torch-export"):
            raise ValueError(f"TorchRuntime loads torchscript or torch-export models, not {framework!r}")
        # BytesIO over bytes shares their buffer: the checked bytes are loaded without a second copy.
        source = str(path) if data is None else io.BytesIO(data)
        self.input_signature = None  # TorchScript declares no input shapes (check_model_io probes it instead)
        try:
            if framework == "torchscript":
                module = torch.jit.load(source, map_location=device)
                module.eval()
            else:
                # An ExportedProgram was traced in the mode it was exported in; its module has no eval().
                program = torch.export.load(source)
                self.input_signature = _exported_input(program, Path(path).name)
                module = program.module().to(device)
        except (Warning, MemoryError, BundleError):
            raise  # a deprecation warning turned error (pytest), memory, or our own refusal
        except Exception as e:  # RuntimeError, pickle and zip errors...: torch has no one type for a bad file
            from . import ModelLoadError

            raise ModelLoadError(f"{Path(path).name}: torch cannot load the {framework} model: {e}") from e
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError("cuda_graphs needs a CUDA device")
        if self.dtype != torch.float32:
            module = module.to(self.dtype)
        self.channels_last = channels_last
        self.module = module
        self.cuda_graphs = cuda_graphs
        self.max_graphs = int(max_graphs)
        self._graphs: dict[tuple, tuple] = {}  # batch shape -> (graph, static input, static output)
        self._torch = torch
        # A torch model with an embedding returns (scores, embedding); the manifest's name documents it.
        self.has_embedding = embedding_output is not None

    @property
    def input_dtype(self) -> str:
        """The dtype name GPU preprocessing should produce for this runtime."""
        return str(self.dtype).removeprefix("torch.")

    def run(self, batch) -> np.ndarray:
        return self._run(batch)[0].float().cpu().numpy()

    def run_with_embedding(self, batch) -> tuple[np.ndarray, np.ndarray]:
        """(scores, embeddings): the model's first two outputs."""
        if not self.has_embedding:
            raise ValueError("this model declares no embedding output")
        outputs = self._run(batch)
        if len(outputs) < 2:
            from ...bundles.bundle import BundleError

            raise BundleError("manifest.embedding_output: the torch model returns one tensor; a model with an "
                              "embedding returns (scores, embedding)")
        return outputs[0].float().cpu().numpy(), outputs[1].float().cpu().numpy()

    def _run(self, batch) -> tuple:
        torch = self._torch
        with torch.inference_mode():
            if isinstance(batch, torch.Tensor):
                x = batch.to(self.device, self.dtype)
            else:
                x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device, self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return self._forward_with_graph(x) if self.cuda_graphs else self._forward(x)

    def _forward(self, x) -> tuple:
        y = self.module(x)
        return tuple(y) if isinstance(y, (tuple, list)) else (y,)

    def _forward_with_graph(self, x):
        torch = self._torch
        key = (tuple(x.shape), x.stride())
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            static_input = x.clone()
            # Warm-up on a side stream (as capture requires) lets lazy initialisation happen outside it.
            side = torch.cuda.Stream(device=x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._forward(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self._forward(static_input)
            entry = self._graphs[key] = (graph, static_input, static_output)
        graph, static_input, static_output = entry
        static_input.copy_(x)
        graph.replay()
        return static_output


def _exported_input(program, name: str):
    """The one image input an ExportedProgram declares: its traced shape (None for a dynamic dimension).
    Its dtype is left open: ``run`` converts every batch to the runtime's dtype."""
    from . import ModelInput, ModelInputError

    names = list(program.graph_signature.user_inputs)
    if len(names) != 1:
        raise ModelInputError(f"{name}: the model has {len(names)} inputs ({', '.join(map(repr, names))}); speciesclf "
                              "feeds one image input (a batch of preprocessed images): export the model with one input")
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name == names[0]), None)
    value = None if node is None else node.meta.get("val")
    shape = getattr(value, "shape", None)
    if shape is None:
        return None
    return ModelInput(names[0], tuple(d if isinstance(d, int) else None for d in shape), None)

"""Tiny ONNX models built in the tests, for behaviours no real model shows on demand."""

from __future__ import annotations

from pathlib import Path


def batch_of_one_onnx(path: Path) -> Path:
    """A 3-class model that runs one image but fails on a batch: its output is Reshaped to batch 1, so
    onnxruntime raises its own exception type (Fail) for N > 1."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["means"], axes=[2, 3], keepdims=0),
         helper.make_node("Reshape", ["means", "shape"], ["output"])],
        "batch-of-one",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path

"""Edits of ONNX graphs, with the ``onnx`` package (the ``onnx`` extra): exposing an inner tensor as an output."""

from __future__ import annotations

from typing import Sequence

__all__ = ["add_output"]


def add_output(model: bytes, tensor: str, *, name: str, scale: str | None = None,
               zero_point: str | None = None, shape: Sequence[int | str] | None = None) -> bytes:
    """The model ``model`` (serialized ONNX) with the inner tensor ``tensor`` as one more output, ``name``.

    With ``scale`` and ``zero_point`` (initializers of the graph) the tensor is quantized and the output is
    its ``DequantizeLinear``: float32 values. Nothing else in the graph changes: the existing outputs keep
    their order (the new one comes last) and their values. ``shape`` declares the output's shape (a string
    for a symbolic dimension, as ``("N", 1280)``); without it, ONNX shape inference must know the tensor's.
    Raises ValueError when the graph has no such tensor or initializers, or already has an output ``name``.
    """
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError as e:  # an optional dependency
        raise ImportError("adding an output to an ONNX model needs the onnx package: "
                          "pip install 'speciesclf[onnx]'") from e

    proto = onnx.load_from_string(model)
    graph = proto.graph
    produced = {output for node in graph.node for output in node.output}
    if tensor not in produced:
        raise ValueError(f"the ONNX graph has no tensor {tensor!r} computed by a node")
    taken = produced | {i.name for i in graph.input} | {i.name for i in graph.initializer}
    if name in taken or name in {o.name for o in graph.output}:
        raise ValueError(f"the ONNX graph already has a tensor called {name!r}")
    if (scale is None) != (zero_point is None):
        raise ValueError("scale and zero_point go together: both or neither")
    inferred = onnx.shape_inference.infer_shapes(proto)
    known = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    if shape is None:
        if tensor not in known or not known[tensor].HasField("shape"):
            raise ValueError(f"ONNX shape inference does not know the shape of {tensor!r}: pass shape=")
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{name}_{i}")
                 for i, d in enumerate(known[tensor].shape.dim)]
    if scale is not None:
        initializers = {i.name for i in graph.initializer}
        missing = [n for n in (scale, zero_point) if n not in initializers]
        if missing:
            raise ValueError(f"the ONNX graph has no initializer {missing[0]!r}")
        graph.node.append(helper.make_node("DequantizeLinear", [tensor, scale, zero_point], [name],
                                           name=f"speciesclf_{name}_dequantize"))
        element = TensorProto.FLOAT
    else:
        if tensor not in known:
            raise ValueError(f"the type of {tensor!r} cannot be inferred: it cannot become an output")
        graph.node.append(helper.make_node("Identity", [tensor], [name], name=f"speciesclf_{name}_identity"))
        element = known[tensor].elem_type
    graph.output.append(helper.make_tensor_value_info(name, element, list(shape)))
    onnx.checker.check_model(proto)
    return proto.SerializeToString()

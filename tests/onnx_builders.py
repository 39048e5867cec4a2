"""Tiny ONNX graphs built by hand for loader and CLI tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_relu_model(
    input_dims: list[int | str] | None = None, opset: int = 17, seed: int = 0
) -> onnx.ModelProto:
    """input (1,3,8,8) -> Conv 3x3 (4 ch) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(2)."""
    rng = np.random.default_rng(seed)
    dims = input_dims or [1, 3, 8, 8]
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    fc = numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "fc")
    fcb = numpy_helper.from_array(np.zeros(2, np.float32), "fcb")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 2])],
        [w, b, fc, fcb],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def quantized_model() -> onnx.ModelProto:
    """A QLinearConv graph, as onnxruntime's static quantizer writes them."""
    x_scale = numpy_helper.from_array(np.array(0.1, np.float32), "xs")
    zero = numpy_helper.from_array(np.array(0, np.uint8), "xz")
    w = numpy_helper.from_array(np.ones((2, 1, 1, 1), np.uint8), "w")
    nodes = [
        helper.make_node(
            "QLinearConv", ["x", "xs", "xz", "w", "xs", "xz", "xs", "xz"], ["y"], name="qconv"
        )
    ]
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [1, 2, 4, 4])],
        [x_scale, zero, w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def quantized_in_function() -> onnx.ModelProto:
    """`conv_relu_model` whose conv weight a local function dequantizes (int8, one scale per
    output channel): a quantized graph that hides its DequantizeLinear in a function body."""
    model = conv_relu_model()
    graph = model.graph
    w = next(t for t in graph.initializer if t.name == "w")
    value = numpy_helper.to_array(w)
    scale = np.abs(value).reshape(4, -1).max(1) / 127
    stored = np.round(value / scale[:, None, None, None]).astype(np.int8)
    w.CopyFrom(numpy_helper.from_array(stored, "w_q"))
    graph.initializer.append(numpy_helper.from_array(scale.astype(np.float32), "w_s"))
    body = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0)]
    function = helper.make_function(
        "local", "Dequant", ["q", "s"], ["w"], body, [helper.make_opsetid("", 17)]
    )
    call = helper.make_node("Dequant", ["w_q", "w_s"], ["w"], domain="local", name="dequant")
    nodes = [call, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    model.opset_import.append(helper.make_opsetid("local", 1))
    model.functions.append(function)
    return model


def conv_in_function(function_opset: int = 17) -> onnx.ModelProto:
    """x (N,3,8,8) -> Conv c1 (16) -> Relu -> local.Block(w2, b2) -> Conv c3 (4) -> y, where
    Block, a model-local function, is Conv 3x3 (16 -> 16) -> Relu: a layer the graph itself
    does not show. Its body's internal tensor is named `w1`, as a graph initializer is."""
    rng = np.random.default_rng(0)
    block = helper.make_function(
        "local",
        "Block",
        ["x", "w", "b"],
        ["y"],
        [
            helper.make_node("Conv", ["x", "w", "b"], ["w1"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["w1"], ["y"]),
        ],
        [helper.make_opsetid("", function_opset)],
    )
    shapes = {"w1": (16, 3, 3, 3), "b1": (16,), "w2": (16, 16, 3, 3), "b2": (16,)}
    shapes |= {"w3": (4, 16, 1, 1), "b3": (4,)}
    weights = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) / 4, n)
        for n, s in shapes.items()
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="r1"),
        helper.make_node("Block", ["r", "w2", "b2"], ["h"], domain="local", name="block"),
        helper.make_node("Conv", ["h", "w3", "b3"], ["y"], name="c3"),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_in_function",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])],
        weights,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[block], ir_version=10)


def int8_weight_only(in_constant: bool = False) -> onnx.ModelProto:
    """`conv_relu_model` whose conv weight is stored by hand as int8 with one float scale per
    output channel: int8 initializer -> Cast to float -> Mul by the scale -> the Conv's weight
    (weight-only int8 without DequantizeLinear). `in_constant`: the int8 values are held by a
    Constant node, as exporters that do not fold constants write them."""
    model = conv_relu_model()
    graph = model.graph
    w = next(t for t in graph.initializer if t.name == "w")
    value = numpy_helper.to_array(w)
    scale = (np.abs(value).reshape(4, -1).max(1) / 127).astype(np.float32)
    stored = np.round(value / scale[:, None, None, None]).astype(np.int8)
    w.CopyFrom(numpy_helper.from_array(stored, "w_q"))
    graph.initializer.append(numpy_helper.from_array(scale.reshape(4, 1, 1, 1), "w_s"))
    dequantise = [
        helper.make_node("Cast", ["w_q"], ["w_f"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["w_f", "w_s"], ["w"], name="scale"),
    ]
    if in_constant:
        graph.initializer.remove(w)
        dequantise.insert(0, helper.make_node("Constant", [], ["w_q"], name="w_q", value=w))
    nodes = [*dequantise, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def weight_from_custom_op(op: str = "Standardise", domain: str = "custom") -> onnx.ModelProto:
    """`conv_relu_model` whose conv weight a custom-domain op computes from the stored one
    (shape inference cannot size it), the conv's output shape recorded in value_info, as
    exporters and quantizers record the activations' shapes."""
    model = conv_relu_model()
    graph = model.graph
    next(t for t in graph.initializer if t.name == "w").name = "w_stored"
    made = helper.make_node(op, ["w_stored"], ["w"], domain=domain, name="make_w")
    nodes = [made, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.value_info.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1, 4, 8, 8]))
    model.opset_import.append(helper.make_opsetid(domain, 1))
    return model


def trt_fp8_qdq() -> onnx.ModelProto:
    """`conv_relu_model` with its input and weight quantized by the `trt` domain's FP8 Q/DQ
    pairs, as NVIDIA ModelOpt exports FP8 models for TensorRT (activation shapes recorded)."""
    model = weight_from_custom_op("TRT_FP8DequantizeLinear", "trt")
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(np.array(0.05, np.float32), "s"))
    graph.node[0].input.append("s")
    graph.node[1].input[0] = "x_dq"
    qdq = [
        helper.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["x_q"], domain="trt"),
        helper.make_node("TRT_FP8DequantizeLinear", ["x_q", "s"], ["x_dq"], domain="trt"),
    ]
    nodes = [*qdq, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def growing_loop() -> onnx.ModelProto:
    """`conv_relu_model` with a Loop between its conv and a second conv that doubles the
    activation's height each iteration (Concat with itself): shape inference gives the Loop's
    output no static shape although every input of the model has one."""
    model = conv_relu_model()
    graph = model.graph
    body = helper.make_graph(
        [
            helper.make_node("Concat", ["v_in", "v_in"], ["v_out"], axis=2),
            helper.make_node("Identity", ["c_in"], ["c_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )
    w2 = np.random.default_rng(1).standard_normal((4, 4, 1, 1)).astype(np.float32)
    graph.initializer.extend(
        [
            numpy_helper.from_array(w2, "w2"),
            numpy_helper.from_array(np.array(2, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "go"),
        ]
    )
    graph.node[1].input[0] = "c2"  # relu reads the second conv
    loop = helper.make_node("Loop", ["trips", "go", "c"], ["grown"], name="grow", body=body)
    conv2 = helper.make_node("Conv", ["grown", "w2"], ["c2"], name="conv2")
    nodes = [graph.node[0], loop, conv2, *graph.node[1:]]
    del graph.node[:]
    graph.node.extend(nodes)
    return model

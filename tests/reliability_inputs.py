"""The inputs of the reliability suite: small models and data files, written once into a folder.

Every case of tests/test_reliability.py runs on a fresh copy of this folder, so
its inputs can be hashed before and after and any file a case leaves is seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from graphs import Builder
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

CLASSES = 10
SIDE = 16
SAMPLES = 24


def tiny_cnn(batch: int | str = "N", layout: str = "NCHW", nan_head: bool = False):
    """A 3-conv classifier on 1x16x16 images (about 60 KB of weights), 10 classes."""
    b = Builder("tiny", seed=0)
    if layout == "NHWC":
        x = b.input("x", [batch, SIDE, SIDE, 1])
        x = b.op("Transpose", [x], perm=[0, 3, 1, 2])
    else:
        x = b.input("x", [batch, 1, SIDE, SIDE])
    x = b.op("Relu", [b.conv(x, 1, 16)])
    x = b.op("Relu", [b.conv(x, 16, 32, stride=2)])
    x = b.op("Relu", [b.conv(x, 32, 32)])
    logits = b.gap_head(x, 32, CLASSES)
    if nan_head:
        logits = b.op("Add", [logits, b.const(np.full(CLASSES, np.nan, np.float32), "nan")])
    return b.model([logits], ["logits"])


def two_inputs():
    b = Builder("two", seed=0)
    x = b.input("x", ["N", 1, SIDE, SIDE])
    z = b.input("z", ["N", 1, SIDE, SIDE])
    x = b.op("Relu", [b.conv(b.op("Add", [x, z]), 1, 8)])
    return b.model([b.gap_head(x, 8, CLASSES)], ["logits"])


def gemm_only():
    """No Conv at all: an MLP on flattened images."""
    b = Builder("mlp", seed=0)
    x = b.op("Flatten", [b.input("x", ["N", 1, SIDE, SIDE])], axis=1)
    w = b.weight(CLASSES, SIDE * SIDE)
    return b.model([b.op("Gemm", [x, w, b.const(np.zeros(CLASSES))], transB=1)], ["logits"])


def loop_model():
    """A Loop whose trip count comes from the input: no shape can be fixed for it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, SIDE, SIDE])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", "c", "d"])
    body = helper.make_graph(
        [helper.make_node("Relu", ["v_in"], ["v_out"], name="body_relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None)],
    )  # fmt: skip
    w = numpy_helper.from_array(np.ones((4, 1, 3, 3), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Shape", ["c"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "zero"], ["n"], name="gather", axis=0),
        helper.make_node("Loop", ["n", "", "c"], ["y"], name="loop", body=body),
    ]
    zero = numpy_helper.from_array(np.array(0, np.int64), "zero")
    graph = helper.make_graph(nodes, "loop", [x], [y], [w, zero])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def bf16_opset17():
    """tiny_cnn in bfloat16 at opset 17, where Conv has no bfloat16 (it came in opset 22): the
    light check at load passes it, the full checker does not."""
    model = tiny_cnn()
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor).astype(np.float32)
        tensor.CopyFrom(
            helper.make_tensor(tensor.name, TensorProto.BFLOAT16, values.shape, values.ravel())
        )
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return model


def nested_external_data(folder: Path) -> onnx.ModelProto:
    """tiny_cnn whose logits pass through a model-local function adding a Constant stored as
    external data in fn.bin, then an If whose branch adds an initializer stored in branch.bin:
    external data that neither the graph's initializers nor its nodes' attributes hold."""
    model = tiny_cnn()
    logits = model.graph.output[0].name
    model.graph.node[-1].output[0] = "head"
    stored = {}
    for name in ("fn", "branch"):
        values = np.full(CLASSES, 0.5, np.float32)
        (folder / f"{name}.bin").write_bytes(values.tobytes())
        tensor = numpy_helper.from_array(values, f"{name}_bias")
        onnx.external_data_helper.set_external_data(tensor, f"{name}.bin", 0, values.nbytes)
        tensor.ClearField("raw_data")
        stored[name] = tensor
    constant = helper.make_node("Constant", [], ["k"], value=stored["fn"])
    add = helper.make_node("Add", ["a", "k"], ["b"])
    opset = [helper.make_opsetid("", 17)]
    function = helper.make_function("fns", "AddC", ["a"], ["b"], [constant, add], opset)
    model.functions.append(function)
    model.opset_import.append(helper.make_opsetid("fns", 1))
    branch = [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)]
    then = helper.make_graph(
        [helper.make_node("Add", ["added", "branch_bias"], ["then_out"])], "then", [], branch,
        [stored["branch"]],
    )  # fmt: skip
    same = [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)]
    identity = helper.make_node("Identity", ["added"], ["else_out"])
    other = helper.make_graph([identity], "else", [], same)
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "yes"))
    model.graph.node.extend([
        helper.make_node("AddC", ["head"], ["added"], domain="fns", name="add_c"),
        helper.make_node("If", ["yes"], [logits], name="if", then_branch=then, else_branch=other),
    ])  # fmt: skip
    return model


def write_inputs(folder: Path) -> Path:
    """Every model and data file the cases name, in `folder`."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_cnn(), folder / "tiny.onnx")
    onnx.save(tiny_cnn(), folder / "teacher.onnx")
    onnx.save(tiny_cnn(batch=8), folder / "fixed8.onnx")
    onnx.save(tiny_cnn(layout="NHWC"), folder / "nhwc.onnx")
    onnx.save(tiny_cnn(nan_head=True), folder / "nan.onnx")
    onnx.save(two_inputs(), folder / "two.onnx")
    onnx.save(gemm_only(), folder / "mlp.onnx")
    onnx.save(loop_model(), folder / "loop.onnx")
    onnx.save(bf16_opset17(), folder / "bf16.onnx")
    onnx.save(
        tiny_cnn(),
        folder / "ext.onnx",
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    onnx.save(nested_external_data(folder), folder / "nested.onnx")
    (folder / "model_dir.onnx").mkdir()

    x = rng.integers(0, 256, (SAMPLES, 1, SIDE, SIDE), dtype=np.uint8)
    y = rng.integers(0, CLASSES, SAMPLES).astype(np.int64)
    np.savez(folder / "data.npz", x=x, y=y)
    np.savez(folder / "val.npz", x=x[:8], y=y[:8])
    np.savez(folder / "nolabels.npz", x=x)
    np.savez(folder / "badlabels.npz", x=x, y=np.where(y == 0, CLASSES + 2, y))
    np.savez(folder / "float01.npz", x=x.astype(np.float32) / 255, y=y)
    np.savez(folder / "float255.npz", x=x.astype(np.float32), y=y)
    np.savez(folder / "floatneg.npz", x=x.astype(np.float32) / 127.5 - 1, y=y)
    np.savez(folder / "nhwcdata.npz", x=x.transpose(0, 2, 3, 1), y=y)
    (folder / "text.npz").write_text("this is not an npz file\n")
    (folder / "notes.txt").write_text("a file, not a folder\n")

    idx = folder / "idx"
    idx.mkdir()
    for prefix, n in (("train", 16), ("t10k", 8)):
        _write_idx(idx / f"{prefix}-images-idx3-ubyte", x[:n, 0])
        _write_idx(idx / f"{prefix}-labels-idx1-ubyte", y[:n].astype(np.uint8))

    for label in range(3):
        (folder / "imgs" / f"class{label}").mkdir(parents=True)
        for k in range(4):
            image = Image.fromarray(x[label * 4 + k, 0])
            image.save(folder / "imgs" / f"class{label}" / f"{k}.png")
    (folder / "out").mkdir()
    return folder


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(header + array.astype(np.uint8).tobytes())

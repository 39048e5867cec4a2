"""Crafted inputs for tests/test_hostile.py: files an attacker or an unlucky user would hand over.

Each is small (at most 1 MB on disk) and written once into a folder beside the reliability
suite's ordinary inputs, so each case can run on a fresh copy and hash what it read.
"""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from reliability_inputs import CLASSES, SAMPLES, SIDE, tiny_cnn, write_inputs

from onnx_mbs.proto_writer import _header


def long_raw_data() -> onnx.ModelProto:
    """tiny_cnn whose first weight's raw_data holds 8 bytes more than its shape."""
    model = tiny_cnn()
    tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
    tensor.raw_data = tensor.raw_data + bytes(8)
    return model


def short_typed_data() -> onnx.ModelProto:
    """tiny_cnn whose first weight is stored in float_data with one value missing."""
    model = tiny_cnn()
    tensor = next(t for t in model.graph.initializer if len(t.dims) == 4)
    values = numpy_helper.to_array(tensor).ravel()[:-1]
    tensor.ClearField("raw_data")
    tensor.float_data.extend(values.tolist())
    return model


def constant_of_shape_bomb(elements: int = 1_500_000_000) -> onnx.ModelProto:
    """tiny_cnn with a side branch: ConstantOfShape([elements]) -> ReduceSum, added to the
    logits. A few bytes in the file ask for `elements` floats."""
    model = tiny_cnn()
    graph = model.graph
    logits = graph.output[0].name
    graph.initializer.append(numpy_helper.from_array(np.array([elements], np.int64), "bomb_shape"))
    graph.node[-1].output[0] = "logits_pre"
    graph.node.extend(
        [
            helper.make_node("ConstantOfShape", ["bomb_shape"], ["bomb"], name="bomb",
                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
            helper.make_node("ReduceSum", ["bomb"], ["bomb_sum"], name="bomb_sum", keepdims=0),
            helper.make_node("Add", ["logits_pre", "bomb_sum"], [logits], name="bomb_add"),
        ]
    )  # fmt: skip
    return model


def expand_bomb() -> onnx.ModelProto:
    """Tile of a 1-element constant by repeats read from the file, shape inference blind to it
    (the repeats come out of a Concat of Shape data)."""
    model = tiny_cnn()
    graph = model.graph
    logits = graph.output[0].name
    graph.node[-1].output[0] = "logits_pre"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.zeros(1, np.float32), "one_value"),
            numpy_helper.from_array(np.array([400_000_000], np.int64), "big_repeat"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Shape", ["one_value"], ["one_shape"], name="bomb_shape"),
            helper.make_node("Mul", ["one_shape", "big_repeat"], ["repeats"], name="bomb_mul"),
            helper.make_node("Tile", ["one_value", "repeats"], ["tiled"], name="bomb_tile"),
            helper.make_node("ReduceSum", ["tiled"], ["tiled_sum"], name="bomb_sum", keepdims=0),
            helper.make_node("Add", ["logits_pre", "tiled_sum"], [logits], name="bomb_add"),
        ]
    )
    return model


def sparse_weights() -> onnx.ModelProto:
    """tiny_cnn whose head bias is a sparse_initializer."""
    model = tiny_cnn()
    graph = model.graph
    bias = next(t for t in graph.initializer if len(t.dims) == 1 and t.dims[0] == CLASSES)
    dense = numpy_helper.to_array(bias)
    graph.initializer.remove(bias)
    values = numpy_helper.from_array(dense, bias.name)
    indices = numpy_helper.from_array(np.arange(CLASSES, dtype=np.int64), "")
    graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [CLASSES]))
    return model


def with_training_info() -> onnx.ModelProto:
    """tiny_cnn with a training_info whose initialization graph makes a tensor of the first
    conv's width (16 channels) and binds it to that conv's bias."""
    model = tiny_cnn()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    bias = conv.input[2]
    init = helper.make_graph(
        [helper.make_node("ConstantOfShape", ["bias_shape"], [bias], name="init_bias")],
        "init",
        [],
        [helper.make_tensor_value_info(bias, TensorProto.FLOAT, [16])],
        [numpy_helper.from_array(np.array([16], np.int64), "bias_shape")],
    )
    info = model.training_info.add()
    info.initialization.CopyFrom(init)
    info.algorithm.CopyFrom(helper.make_graph([], "algorithm", [], []))
    binding = info.initialization_binding.add()
    binding.key, binding.value = bias, bias
    return model


def nested_if(depth: int = 40) -> bytes:
    """tiny_cnn whose output passes through `depth` nested If nodes (always true), serialized
    by hand: protobuf itself refuses to build a message this deep."""
    model = tiny_cnn()
    graph = model.graph
    logits = graph.output[0].name
    graph.node[-1].output[0] = "logits_0"
    graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    body = helper.make_graph(
        [helper.make_node("Identity", ["logits_0"], ["if_out"], name="innermost")],
        "innermost",
        [],
        [helper.make_tensor_value_info("if_out", TensorProto.FLOAT, None)],
    ).SerializeToString()
    for level in range(depth, 0, -1):
        output = logits if level == 1 else f"if_out_{level}"
        node = _if_node(level, output, body)
        if level == 1:
            return model.SerializeToString() + _field(7, _field(1, node))  # merged into graph
        head = helper.make_graph(
            [], f"b{level}", [], [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)]
        )
        body = head.SerializeToString() + _field(1, node)
    raise ValueError("depth must be at least 1")


def _if_node(level: int, output: str, then_body: bytes) -> bytes:
    leaf = helper.make_graph(
        [helper.make_node("Identity", ["logits_0"], [f"else_{level}"], name=f"else_{level}")],
        f"else_{level}",
        [],
        [helper.make_tensor_value_info(f"else_{level}", TensorProto.FLOAT, None)],
    )
    node = helper.make_node("If", ["cond"], [output], name=f"if_{level}", else_branch=leaf)
    then = _field(1, b"then_branch") + _field(6, then_body) + bytes([20 << 3 & 0x7F | 0x80, 1, 5])
    return node.SerializeToString() + _field(5, then)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (the key and length as save writes them)."""
    return _header(number, len(payload)) + payload


def float64_cnn() -> onnx.ModelProto:
    """tiny_cnn in float64: valid ONNX that onnxruntime's CPU provider has no Conv for."""
    model = tiny_cnn()
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype == np.float32:
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float64), tensor.name))
    for value in [*model.graph.input, *model.graph.output]:
        value.type.tensor_type.elem_type = TensorProto.DOUBLE
    return model


def bad_gather() -> onnx.ModelProto:
    """tiny_cnn whose logits pass through a Gather with an index past the classes: valid to
    the checker and shape inference, an error only when onnxruntime runs it."""
    model = tiny_cnn()
    graph = model.graph
    logits = graph.output[0].name
    graph.node[-1].output[0] = "logits_pre"
    indices = np.array([*range(CLASSES - 1), CLASSES + 2], np.int64)
    graph.initializer.append(numpy_helper.from_array(indices, "picked"))
    graph.node.append(
        helper.make_node("Gather", ["logits_pre", "picked"], [logits], name="pick", axis=1)
    )
    return model


def conv1d() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 32])
    w = numpy_helper.from_array(np.ones((8, 1, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1])
    graph = helper.make_graph([node], "conv1d", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def png_bomb(path: Path, side: int = 30_000) -> None:
    """A valid grayscale PNG of side x side black pixels (900 M pixels) in under 1 MB."""
    row = bytes(side + 1)  # filter byte + pixels
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return len(body).to_bytes(4, "big") + kind + body + crc.to_bytes(4, "big")

    header = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def write_hostile_inputs(folder: Path) -> Path:
    """The reliability inputs plus every crafted file the hostile cases name, in `folder`."""
    write_inputs(folder)
    onnx.save(long_raw_data(), folder / "longraw.onnx")
    onnx.save(short_typed_data(), folder / "shorttyped.onnx")
    onnx.save(constant_of_shape_bomb(), folder / "cosbomb.onnx")
    onnx.save(expand_bomb(), folder / "tilebomb.onnx")
    onnx.save(sparse_weights(), folder / "sparse.onnx")
    onnx.save(with_training_info(), folder / "traininfo.onnx")
    (folder / "nested.onnx").write_bytes(nested_if())
    (folder / "nested3.onnx").write_bytes(nested_if(3))
    onnx.save(conv1d(), folder / "conv1d.onnx")
    # External data longer than the shape (no length recorded): the whole file is read.
    onnx.save(tiny_cnn(), folder / "extlong.onnx", save_as_external_data=True,
              location="extlong.bin", size_threshold=0)  # fmt: skip
    with open(folder / "extlong.bin", "ab") as data:
        data.write(bytes(64))
    _strip_lengths(folder / "extlong.onnx")
    # External data outside the model's folder.
    (folder / "sub").mkdir()
    onnx.save(tiny_cnn(), folder / "sub" / "escape.onnx", save_as_external_data=True,
              location="escape.bin", size_threshold=0)  # fmt: skip
    (folder / "sub" / "escape.bin").rename(folder / "escape.bin")
    _relocate(folder / "sub" / "escape.onnx", "../escape.bin")

    dynamic = tiny_cnn()
    dims = dynamic.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "H", "W"
    onnx.save(dynamic, folder / "dyn.onnx")
    onnx.save(float64_cnn(), folder / "f64.onnx")
    onnx.save(bad_gather(), folder / "badgather.onnx")
    (folder / "oldrep").mkdir()
    for name in ("report.json", "report.md", "widths.png"):
        (folder / "oldrep" / name).write_text("an earlier report\n")
    # A report folder where a report file's name is a folder of the user's.
    (folder / "dirrep" / "widths.png").mkdir(parents=True)
    (folder / "dirrep" / "widths.png" / "mine.txt").write_text("not onnx-mbs's\n")

    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (SAMPLES, SIDE, SIDE), dtype=np.uint8)
    y = rng.integers(0, CLASSES, SAMPLES)
    for bits, name in ((8, "png8"), (16, "png16")):
        for label in range(2):
            (folder / name / f"c{label}").mkdir(parents=True)
            for k in range(4):
                pixels = x[label * 4 + k]
                image = (
                    Image.fromarray(pixels)
                    if bits == 8
                    else Image.fromarray(pixels.astype(np.uint16) * 257)  # I;16, same levels
                )
                image.save(folder / name / f"c{label}" / f"{k}.png")
    (folder / "int32" / "c0").mkdir(parents=True)
    Image.fromarray(x[0].astype(np.int32) * 1000).save(folder / "int32" / "c0" / "0.tif")
    (folder / "bomb" / "c0").mkdir(parents=True)
    png_bomb(folder / "bomb" / "c0" / "bomb.png")
    # Two of them: retrain refuses a single training sample before it reads any.
    shutil.copyfile(folder / "bomb" / "c0" / "bomb.png", folder / "bomb" / "c0" / "bomb2.png")
    np.savez(folder / "badlabels2d.npz", x=x[:, None], y=np.stack([y, y], 1))
    np.savez(folder / "pickled.npz", x=np.array([{"a": 1}] * SAMPLES, dtype=object))
    np.savez(folder / "wide.npz", x=rng.integers(0, 256, (4, 2, 5, 7), dtype=np.uint8))
    return folder


def _strip_lengths(path: Path) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        kept = [e for e in tensor.external_data if e.key != "length"]
        del tensor.external_data[:]
        tensor.external_data.extend(kept)
    path.write_bytes(model.SerializeToString())


def _relocate(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())

"""MBS's numbers on the bundled ResNet-20 recomputed independently (numpy and onnxruntime on
the plain model), per docs/mbs.md: rho at the first activation after each conv, MACs, the
receptive field in input pixels, macroblocks by output size, E, E_B (the layers whose field
fits, and the first layers: those no conv of their macroblock feeds), R and beta."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnx_mbs.models import FMNIST_SAMPLE
from onnx_mbs.pipeline import reduce

SAMPLES = 128
THROUGH = {"BatchNormalization", "Add", "Identity"}  # what ResNet-20 puts before a Relu


def _recompute(path, x: np.ndarray) -> tuple[dict, list]:
    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    relu_of = {}
    for conv in convs:  # breadth first to the first Relu
        frontier, found = [conv.output[0]], None
        while frontier and found is None:
            for node in readers.get(frontier.pop(0), []):
                if node.op_type == "Relu":
                    found = node.output[0]
                    break
                if node.op_type in THROUGH:
                    frontier.append(node.output[0])
        relu_of[conv.name] = found
    watched = sorted({t for t in relu_of.values() if t})
    # The Relus, then the conv outputs' sizes on one sample: a session that returns a conv's
    # output cannot fuse the BatchNorm after it, and rounds differently next to 0.
    conv_outputs = [c.output[0] for c in convs]
    fraction = {t: float((v > 0).mean()) for t, v in zip(watched, _run(model, watched, x))}
    sizes = dict(zip(conv_outputs, (v.shape for v in _run(model, conv_outputs, x[:1]))))
    field = {model.graph.input[0].name: (1, 1)}  # (receptive field, step) in input pixels
    for node in model.graph.node:
        known = [t for t in node.input if t in field]
        if not known:
            continue
        if node.op_type == "Conv":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            k = weights[node.input[1]].shape[2]
            rf, step = field[node.input[0]]
            field[node.output[0]] = (rf + (k - 1) * step, step * attrs.get("strides", [1])[0])
        elif node.op_type == "GlobalAveragePool":
            field[node.output[0]] = (np.inf, np.inf)
        else:
            field[node.output[0]] = (max(field[t][0] for t in known), field[known[0]][1])
    layers, blocks = {}, {}
    for conv in convs:
        out, (_, cin, kh, kw) = sizes[conv.output[0]], weights[conv.input[1]].shape
        macs = out[2] * out[3] * kh * kw * cin * out[1]
        rho = fraction[relu_of[conv.name]]
        layers[conv.name] = (macs, rho, field[conv.output[0]][0])
        blocks.setdefault(out[2:], []).append(conv.name)
    behind: dict[str, set] = {}  # tensor -> the output sizes of the convs it comes after
    first = set()  # the convs no conv of their own macroblock feeds: always in the base
    for node in model.graph.node:
        after = set().union(*(behind.get(t, set()) for t in node.input))
        if node.op_type == "Conv":
            size = tuple(sizes[node.output[0]][2:])
            if size not in after:
                first.add(node.name)
            after = after | {size}
        for t in node.output:
            behind[t] = after
    plan = []
    for names in blocks.values():
        effective = [layers[n][0] * layers[n][1] for n in names]
        base = [e for n, e in zip(names, effective) if n in first or layers[n][2] <= 28]
        r = max(0.0, 1 - sum(base) / sum(effective))
        plan.append((sum(effective), sum(base), r, min(1.0, max(0.1, 1 - 0.4 * r))))
    return layers, plan


def _run(model: onnx.ModelProto, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The tensors `names` of `model` on `x`, as graph outputs of a copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.output[:]
    copy.graph.output.extend(helper.make_empty_tensor_value_info(t) for t in names)
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {model.graph.input[0].name: x})


def test_rho_macs_fields_and_widths_match_an_independent_recomputation(bundled_model_path):
    with np.load(FMNIST_SAMPLE) as npz:
        raw = npz["x"][:SAMPLES]
    x = ((raw.astype(np.float32) / 255 - 0.286041) / 0.353024).astype(np.float32)
    layers, plan = _recompute(bundled_model_path, x)
    _, report = reduce(
        str(bundled_model_path), str(FMNIST_SAMPLE), limit=SAMPLES, progress=False,
        evaluate_accuracy=False, batch_size=48,
    )  # fmt: skip
    assert [layer.name for layer in report.before.layers] == list(layers)
    for layer in report.before.layers:
        macs, rho, field = layers[layer.name]
        assert layer.macs == macs and layer.global_receptive_field == field
        assert report.rho[layer.name] == pytest.approx(rho, abs=1e-9)
    assert len(report.plan.macroblocks) == len(plan) == 3
    for planned, (e, e_base, r, beta) in zip(report.plan.macroblocks, plan, strict=True):
        assert planned.effective_flops == pytest.approx(e, rel=1e-9)
        assert planned.base_effective_flops == pytest.approx(e_base, rel=1e-9)
        assert planned.redundancy == pytest.approx(r, abs=1e-9)
        assert planned.beta == pytest.approx(beta, abs=1e-9)
    assert 0 < plan[1][2] < plan[2][2] < 1  # the deeper macroblocks are the redundant ones

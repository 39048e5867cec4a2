"""What a reduction decided, in terms that do not depend on how the graph is written.

Convs are named by their weights' values (a fingerprint that survives renaming, a BatchNorm
folded in, input channels permuted), the channels each keeps by the positions of the
written weights' values in the input's: two forms of one network compare as equal when
their plans are the same. Used by tests/test_plan_metamorphic.py.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from graphs import run
from onnx import numpy_helper

import onnx_mbs
from onnx_mbs.passes import analyze_model, load_model


def _weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict, list]:
    form = load_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in form.graph.initializer}
    return form, inits, analyze_model(form).layers


def fingerprint(weight: np.ndarray) -> tuple:
    """The conv's shape (input channels as a set size) and each of its first filters' largest
    magnitudes over the filter's norm: the same for the same filters scaled per output
    channel or with input channels permuted."""
    rows = np.abs(weight.reshape(len(weight), -1).astype(np.float64))
    rows = rows / np.maximum(rows.max(axis=1, keepdims=True), 1e-30)
    return (weight.shape, tuple(tuple(np.round(np.sort(r)[-3:], 4)) for r in rows[:4]))


@dataclass
class Outcome:
    macroblocks: list[tuple]  # (resolution, layers, base layers, params, macs)
    fields: dict[tuple, tuple[float, float]]  # conv -> (local, global) receptive field
    layer_macs: dict[tuple, int]
    total_params: int
    total_macs: int
    plan_params: tuple[int, int]
    plan_macs: tuple[int, int]
    betas: list[float | None]
    kept: dict[tuple, tuple[int, ...]]  # conv -> output channels kept (positions)
    written: onnx.ModelProto
    pinned: list[str]

    def differences(self, other: Outcome) -> list[str]:
        out = []
        for name in ("macroblocks", "fields", "layer_macs", "total_params", "total_macs",
                     "plan_params", "plan_macs", "betas", "kept"):  # fmt: skip
            mine, theirs = getattr(self, name), getattr(other, name)
            if name == "betas":
                mine = [None if b is None else round(b, 4) for b in mine]
                theirs = [None if b is None else round(b, 4) for b in theirs]
            if mine != theirs:
                out.append(name)
        return out


def outcome(model: onnx.ModelProto, data, **options) -> Outcome:
    options.setdefault("progress", False)
    small, report = onnx_mbs.reduce(model, data, **options)
    _, inits, layers = _weights(model)
    key = {layer.name: fingerprint(inits[layer.weight]) for layer in layers}
    where: dict[bytes, set[tuple]] = {}  # a kernel's values -> the (conv, out) holding it
    for layer in layers:
        flat = inits[layer.weight].reshape(*inits[layer.weight].shape[:2], -1)
        for o, i in np.ndindex(*flat.shape[:2]):
            where.setdefault(flat[o, i].tobytes(), set()).add((key[layer.name], o))
    _, small_inits, small_layers = _weights(small)
    kept: dict[tuple, tuple[int, ...]] = {}
    for layer in small_layers:
        flat = small_inits[layer.weight].reshape(*small_inits[layer.weight].shape[:2], -1)
        votes = [  # each written filter: the (conv, out) most of its kernels are found in
            Counter(hit for kernel in row for hit in where.get(kernel.tobytes(), ()))
            for row in flat
        ]
        hits = [v.most_common(1)[0][0] if v else None for v in votes]
        convs = Counter(h[0] for h in hits if h)
        conv = convs.most_common(1)[0][0] if convs else None
        if conv is not None and all(h and h[0] == conv for h in hits):
            kept[conv] = tuple(sorted(h[1] for h in hits))
        else:
            kept[("unmatched", len(flat))] = (len(flat),)

    def rf(x: float) -> float:
        return math.inf if math.isinf(x) else round(x, 3)

    before = report.before
    return Outcome(
        macroblocks=[
            (m.resolution, len(m.layers), len(m.base_layers), m.params, m.macs)
            for m in before.macroblocks
        ],
        fields={
            key[x.name]: (rf(x.local_receptive_field), rf(x.global_receptive_field))
            for x in before.layers
        },
        layer_macs={key[x.name]: x.macs for x in before.layers},
        total_params=before.total_params,
        total_macs=before.total_macs,
        plan_params=report.plan.params,
        plan_macs=report.plan.macs,
        betas=[m.beta for m in report.plan.macroblocks],
        kept=kept,
        written=small,
        pinned=report.pinned,
    )


def output_gap(a: onnx.ModelProto, b: onnx.ModelProto, feeds: dict) -> float:
    """The largest difference between two models' outputs on the same inputs, relative to
    the first's largest magnitude."""
    gaps = []
    for x, y in zip(run(a, feeds), run(b, feeds), strict=True):
        gaps.append(float(np.max(np.abs(x - y))) / max(float(np.max(np.abs(x))), 1e-6))
    return max(gaps)

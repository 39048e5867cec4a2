"""Every small zoo model, written the ways other exporters write it, reads as its canonical form.

Same `analyze` counts, same outputs with every channel kept, dead channels
removed exactly, `params=0.7` reached within 2 points, and the written model
runs at batch 1 and 2 with the original input and output names.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import REDUCIBLE_ZOO
from graphs import assert_runs_at_declared_shapes, assert_same_outputs, kill_channels, run
from variants import VARIANTS

from onnx_mbs.models.export import build_zoo_model, export_onnx
from onnx_mbs.models.zoo import ZOO
from onnx_mbs.passes import analyze_model, count_parameters, load_model, shrink_channels
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.pipeline import reduce

_CACHE: dict[tuple[str, int], onnx.ModelProto] = {}


def canonical(name: str, opset: int = 17) -> onnx.ModelProto:
    """The zoo model exported with a dynamic batch (deploy form, as shipped)."""
    if (name, opset) not in _CACHE:
        _CACHE[name, opset] = export_onnx(
            build_zoo_model(name), ZOO[name].test_input_shape, dynamic_batch=True, opset=opset
        )
    out = onnx.ModelProto()
    out.CopyFrom(_CACHE[name, opset])
    return out


# The version converter cannot go down from 17, so older opsets come from the exporter.
FORMS = {**VARIANTS, "opset11": lambda m: m, "opset13": lambda m: m}
OPSET_OF = {"opset11": 11, "opset13": 13}


def variant(name: str, form: str) -> onnx.ModelProto:
    return FORMS[form](canonical(name, OPSET_OF.get(form, 17)))


def _zoo(fast: list[str]) -> list:
    """The zoo models with channels to cut, those outside `fast` behind the slow marker."""
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in REDUCIBLE_ZOO]


def _counts(model: onnx.ModelProto) -> tuple:
    a = analyze_model(load_model(model))
    return (
        a.total_params,
        a.total_macs,
        len(a.layers),
        [(m.resolution, len(m.layers), len(m.base_layers)) for m in a.macroblocks],
    )


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", _zoo(["resnet20", "shufflenet_v2"]))
def test_exporter_variant_reads_as_canonical(name, form):
    original = canonical(name)
    model = variant(name, form)
    onnx.checker.check_model(model)
    assert _counts(model) == _counts(original)

    loaded = load_model(model)
    # every channel kept: the same function
    channels = analyze_channels(loaded)
    keep_all = {g.id: np.arange(g.size) for g in channels.groups}
    assert_same_outputs(loaded, shrink_channels(loaded, keep_all, channels))
    # dead channels removed exactly
    free = [g for g in channels.groups if not g.pinned and g.size > 1]
    assert free, "a zoo model has channels that can be cut"
    drop = {g.id: [0] for g in free[:4]}
    dead = kill_channels(loaded, channels.groups, drop)
    dead_channels = analyze_channels(dead)
    keep = {g: np.setdiff1d(np.arange(channels.groups[g].size), d) for g, d in drop.items()}
    assert_same_outputs(dead, shrink_channels(dead, keep, dead_channels), atol=1e-4)


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", _zoo(["resnet20"]))
def test_exporter_variant_reduces_to_a_model_that_runs_at_any_batch(name, form):
    original = canonical(name)
    model = variant(name, form)
    reduced, report = reduce(model, budget="params=0.7", progress=False)
    assert report.plan.reached["params"] == pytest.approx(0.7, abs=0.02)
    onnx.checker.check_model(reduced, full_check=True)
    assert [i.name for i in reduced.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in reduced.graph.output] == [o.name for o in original.graph.output]
    assert count_parameters(load_model(reduced)) == report.after.total_params
    assert_runs_at_declared_shapes(original, reduced)  # some variants do not run themselves
    shape = ZOO[name].test_input_shape
    for batch in (1, 2):
        x = np.random.default_rng(batch).normal(size=(batch, *shape[1:])).astype(np.float32)
        (out,) = run(reduced, {original.graph.input[0].name: x})
        assert out.shape == (batch, ZOO[name].num_classes)

"""The cost model predicts exactly what shrinking produces, for random plans on zoo models."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FORMS, SMALL_ZOO

from onnx_mbs.passes import analyze_model, count_parameters, load_model
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.cost import CostModel
from onnx_mbs.passes.shrink import shrink_channels


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_cost_model_matches_shrunk_model(zoo_onnx, name, form):
    model = load_model(zoo_onnx(name, form))
    channels = analyze_channels(model)
    cost = CostModel.build(model, channels)
    before = analyze_model(model)
    assert cost({}) == (before.total_params, before.total_macs)
    rng = np.random.default_rng(1)
    for _ in range(3):
        counts = {
            g.id: g.size if g.pinned else int(rng.integers(1, g.size + 1)) for g in channels.groups
        }
        keep = {
            g: sorted(rng.choice(size, counts[g], replace=False).tolist())
            for g, size in enumerate(cost.sizes.tolist())
        }
        reduced = load_model(shrink_channels(model, keep, channels))
        assert cost(counts) == (count_parameters(reduced), analyze_model(reduced).total_macs)


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_every_step_at_once_equals_one_query_per_step(zoo_onnx, name):
    """`with_steps` (all of a planner's next steps in one query) gives, for each step, what
    the model gives for that step's counts alone."""
    model = load_model(zoo_onnx(name, FORMS[0]))
    cost = CostModel.build(model, analyze_channels(model))
    rng = np.random.default_rng(2)
    sizes = cost.sizes.tolist()
    counts = {g: int(rng.integers(1, size + 1)) for g, size in enumerate(sizes)}
    groups = list(range(len(sizes)))
    new = [max(1, counts[g] - int(rng.integers(-3, 4))) for g in groups]
    new = [min(n, size) for n, size in zip(new, sizes)]
    params, macs = cost.with_steps(counts, groups, new)
    expected = [cost({**counts, g: n}) for g, n in zip(groups, new)]
    assert [(int(p), int(m)) for p, m in zip(params, macs)] == expected
    params, macs = cost.with_steps({}, groups[:1], [1])  # counts omitted: the full sizes
    assert (int(params[0]), int(macs[0])) == cost({0: 1})

"""The plan does not follow how a network is written.

One network written in equivalent ONNX forms (`variants.EQUIVALENT`: Identity, Dropout or
Cast-to-same-type nodes inserted, a Conv's bias as an Add, BatchNorm folded, Relu as Clip or
Max(x, 0), x * 1, Flatten as Reshape, GlobalAveragePool as ReduceMean, Gemm as MatMul + Add,
padding as a Pad node, a Concat's inputs reversed with its readers' weights permuted, shared
initializers apart or merged, renamed tensors, value_info, doc strings, another node order,
and the exporter forms of `variants.VARIANTS`) must get the same analysis and plan: the
macroblocks, each conv's receptive fields and MACs, the parameter and MAC counts, the
widths, and which channels each conv keeps (`plan_outcome`: convs named by their weights);
the written models then compute the same outputs.

Documented differences (`DIFFERS`): BatchNorm folded into its conv drops its 2 x C
parameters (gamma, beta) from the count, so a params budget's fraction is of another total,
and l1 and l2 read the folded filters (`bn` folds the BatchNorm in: the same on both forms);
equal initializers merged into one count once (docs/design.md, "each float initializer ...
once however many nodes read it": the bundled ResNet-20's two BN betas before each
downsampling Add were trained equal); `bn` importance scales by a BatchNormalization node's
gamma / sqrt(var + eps) only, not by a BatchNorm written as Mul + Add (passes/importance.py).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from plan_outcome import Outcome, outcome, output_gap
from variants import EQUIVALENT

from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE

SETTINGS = {
    "mbs": {},  # no budget: MBS with act importance from the data
    "params": {"budget": "params=0.5"},  # auto: mbs-branch
    "flops_bn": {"budget": "flops=0.5", "strategy": "mbs", "importance": "bn"},
    "global_l2": {"budget": "flops=0.5", "strategy": "global", "importance": "l2"},
}
COUNTS = {"total_params", "plan_params", "macroblocks"}  # macroblocks: their params
# (variant, setting) -> what may differ, and why (the module docstring)
DIFFERS: dict[tuple[str, str], set[str]] = {
    **{("bn_folded", s): COUNTS for s in SETTINGS},
    ("bn_folded", "params"): COUNTS | {"kept", "plan_macs", "betas"},
    ("bn_folded", "global_l2"): COUNTS | {"kept", "plan_macs", "plan_params"},
    **{("merged", s): COUNTS for s in SETTINGS},
    ("merged", "params"): COUNTS | {"kept", "plan_macs", "betas"},
    ("bn_affine", "flops_bn"): {"kept"},  # bn reads a BatchNormalization node, not Mul + Add
}


@pytest.fixture(scope="module")
def bundled() -> onnx.ModelProto:
    return onnx.load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    x = np.load(FMNIST_SAMPLE)["x"][:8]
    return {"input": ((x / 255.0 - 0.286041) / 0.353024).astype(np.float32)}


@pytest.fixture(scope="module")
def baselines(bundled: onnx.ModelProto) -> dict[str, Outcome]:
    return {name: outcome(bundled, FMNIST_SAMPLE, limit=32, **s) for name, s in SETTINGS.items()}


FAST = ("mbs", "flops_bn")  # the others under -m slow


@pytest.mark.parametrize(
    "setting", [s if s in FAST else pytest.param(s, marks=pytest.mark.slow) for s in SETTINGS]
)
@pytest.mark.parametrize("variant", list(EQUIVALENT))
def test_equivalent_forms_get_one_plan(bundled, baselines, feeds, variant, setting):
    rewritten = EQUIVALENT[variant](bundled)
    got = outcome(rewritten, FMNIST_SAMPLE, limit=32, **SETTINGS[setting])
    base = baselines[setting]
    allowed = DIFFERS.get((variant, setting), set())
    assert set(base.differences(got)) <= allowed, [
        (name, getattr(base, name), getattr(got, name)) for name in base.differences(got)
    ]
    if "kept" not in allowed:
        assert output_gap(base.written, got.written, feeds) < 1e-4


def with_biases(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """`model` with a random bias on every Conv that has none (before its BatchNorm)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    rng = np.random.default_rng(seed)
    sizes = {t.name: t.dims[0] for t in out.graph.initializer}
    for k, node in enumerate(out.graph.node):
        if node.op_type == "Conv" and len(node.input) == 2:
            bias = rng.normal(0, 0.1, sizes[node.input[1]]).astype(np.float32)
            out.graph.initializer.append(onnx.numpy_helper.from_array(bias, f"bias_{k}"))
            node.input.append(f"bias_{k}")
    return out


def test_bn_importance_reads_through_a_bias_written_apart(bundled, feeds):
    """Conv -> Add(bias) -> BatchNorm (Paddle2ONNX writes conv biases so): the BatchNorm's
    scale is what `bn` folds in either way; only the macroblocks' conv params (which leave
    an Add's constant to the totals) differ."""
    biased = with_biases(bundled)
    setting = SETTINGS["flops_bn"]
    base = outcome(biased, FMNIST_SAMPLE, limit=32, **setting)
    got = outcome(EQUIVALENT["bias_add"](biased), FMNIST_SAMPLE, limit=32, **setting)
    assert base.differences(got) == ["macroblocks"]
    assert output_gap(base.written, got.written, feeds) < 1e-4

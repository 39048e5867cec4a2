"""A field suite: real architectures onnx-mbs did not write, from torchvision and timm.

torchvision is imported through `onnx_mbs.models.torchvision_cpu` (PyPI's wheel
is built against a CUDA torch: its C++ ops, which these models never call, are
left out). Weights are random; nothing is downloaded.

For each architecture: analyze finds its convs, keeping every channel is exact,
`reduce --budget params=0.7` writes a valid model (full checker, same I/O names,
batch 1 and 2), and at default settings no group of a beta-1 macroblock loses
channels. Two run by default; the rest are slow (`bash scripts/test.sh -m slow`).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import random_images, write_npz
from field_models import Conv, SpaceToDepthStem, YOLOv8Style
from graphs import (
    assert_runs_at_declared_shapes,
    assert_same_outputs,
    declared_dims,
    dynamic_input_model,
    run,
)

from onnx_mbs.cli import main
from onnx_mbs.models.export import export_onnx, randomize_batchnorm
from onnx_mbs.models.torchvision_cpu import import_torchvision
from onnx_mbs.passes import (
    BadInputError,
    FoldShapes,
    InferShapes,
    NameNodes,
    ShrinkChannels,
    analyze_model,
    count_parameters,
    load,
    load_model,
    shrink_channels,
)
from onnx_mbs.passes.channel_groups import analyze_channels
from onnx_mbs.passes.read import check_model
from onnx_mbs.pipeline import MacroblockScaling, reduce


def torchvision_models():
    """`torchvision.models`, imported next to the CPU torch."""
    return import_torchvision().models


def timm_model(name: str) -> torch.nn.Module:
    """A timm architecture with random weights (timm imports torchvision: see above)."""
    torchvision_models()
    import timm

    return timm.create_model(name, pretrained=False)


class First(torch.nn.Module):
    """Segmentation models return a dict; detection backbones a dict of maps."""

    def __init__(self, model: torch.nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x):
        return self.model(x)[self.key]


def _build(name: str) -> torch.nn.Module:
    m = torchvision_models()
    seg = m.segmentation
    builders = {
        "mobilenet_v3_small": lambda: m.mobilenet_v3_small(),  # SE, HardSwish
        "shufflenet_v2_x0_5": lambda: m.shufflenet_v2_x0_5(),  # channel shuffle, split
        "efficientnet_b0": lambda: m.efficientnet_b0(),  # SiLU, SE, depthwise
        "regnet_x_400mf": lambda: m.regnet_x_400mf(),  # grouped convs
        "resnext50_32x4d": lambda: m.resnext50_32x4d(),  # grouped bottlenecks
        "densenet121": lambda: m.densenet121(),  # dense concat
        "googlenet": lambda: m.googlenet(aux_logits=False, init_weights=True),  # inception
        "squeezenet1_1": lambda: m.squeezenet1_1(),  # fire concat, conv head
        "mnasnet0_5": lambda: m.mnasnet0_5(),
        "mobilenet_v2": lambda: m.mobilenet_v2(),
        "convnext_tiny": lambda: m.convnext_tiny(),  # LayerNorm, GELU: no activation to measure
        "resnet18": lambda: m.resnet18(),
        "regnet_y_400mf": lambda: m.regnet_y_400mf(),  # SE and grouped convs
        "deeplabv3_mobilenet_v3_large": lambda: First(  # dilated segmentation head
            seg.deeplabv3_mobilenet_v3_large(weights_backbone=None, aux_loss=False), "out"
        ),
        "lraspp_mobilenet_v3_large": lambda: First(  # multi-resolution fusion
            seg.lraspp_mobilenet_v3_large(weights_backbone=None), "out"
        ),
        "ssdlite_backbone": lambda: First(  # a detection backbone (extra feature layers)
            m.detection.ssdlite320_mobilenet_v3_large(weights_backbone=None).backbone, "0"
        ),
        "ghostnet_050": lambda: timm_model("ghostnet_050"),  # ghost modules (timm)
        "hrnet_w18_small": lambda: timm_model("hrnet_w18_small"),  # multi-resolution fusion
        "nf_resnet26": lambda: timm_model("nf_resnet26"),  # weight standardisation in the graph
        "tresnet_m": lambda: timm_model("tresnet_m"),  # space-to-depth stem written as views
    }
    torch.manual_seed(0)
    return randomize_batchnorm(builders[name]()).eval()


FAST = ["mobilenet_v3_small", "shufflenet_v2_x0_5"]
SLOW = [
    "efficientnet_b0", "regnet_x_400mf", "resnext50_32x4d", "densenet121", "googlenet",
    "squeezenet1_1", "mnasnet0_5", "mobilenet_v2", "convnext_tiny", "resnet18", "regnet_y_400mf",
    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "ssdlite_backbone",
    "ghostnet_050", "hrnet_w18_small", "nf_resnet26", "tresnet_m",
]  # fmt: skip
SIZE = {"ssdlite_backbone": 96}
# Architectures where every group is pinned: a budget is refused in one line. (ConvNeXt's
# channels-last LayerNorm is cut with its channels now, and the report says it is not exact.)
ALL_PINNED: set[str] = set()


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_field_architecture(name):
    size = SIZE.get(name, 64)
    model = export_onnx(_build(name), (1, 3, size, size), dynamic_batch=True)

    loaded = load_model(model)
    assert analyze_model(loaded).layers
    channels = analyze_channels(loaded)
    keep_all = {g.id: np.arange(g.size) for g in channels.groups}
    assert_same_outputs(loaded, shrink_channels(loaded, keep_all, channels), atol=1e-4)

    if name in ALL_PINNED:
        with pytest.raises(BadInputError, match="smallest plan keeps params 100.0%"):
            reduce(model, budget="params=0.7", progress=False)
        return
    reduced, report = reduce(model, budget="params=0.7", progress=False)
    assert report.plan.reached["params"] <= 0.72
    check_model(reduced, full_check=True)
    assert [i.name for i in reduced.graph.input] == ["input"]
    assert [o.name for o in reduced.graph.output] == [o.name for o in model.graph.output]
    for batch in (1, 2):
        x = np.random.default_rng(batch).normal(size=(batch, 3, size, size)).astype(np.float32)
        (y,) = run(reduced, {"input": x})
        assert y.shape[0] == batch and np.isfinite(y).all()

    _, default = reduce(model, progress=False)
    beta = {m.index: m.beta for m in default.plan.macroblocks}
    for g in default.groups:
        if g.macroblocks and max(beta[m] for m in g.macroblocks) == 1.0:
            assert default.plan.counts[g.id] == g.size, (g.id, g.size, g.producers)


# -- models whose shape arithmetic follows the image size (issue 25) -------------------------

SIZE_64 = [1, 3, 64, 64]


def _dynamic_export(module: torch.nn.Module, size: int = 64, imgsz: bool = False):
    """`module` with random BN statistics, exported with dynamic batch, height and width;
    with `imgsz`, the size it was made for recorded as Ultralytics records it."""
    torch.manual_seed(0)
    model = export_onnx(
        randomize_batchnorm(module),
        (1, 3, size, size),
        dynamic_batch=True,
        dynamic_size=True,
        output_names=("output",),
    )
    if imgsz:
        model.metadata_props.add(key="imgsz", value=f"[{size}, {size}]")
    return model


def _keep_all_is_exact(model: onnx.ModelProto, shape: list[int], *others: tuple) -> None:
    """Keeping every channel, the written model computes what `model` computes at the
    analysed shape and at `others`."""
    read = load(model, {"input": shape})
    channels = analyze_channels(read.model)
    keep_all = {g.id: np.arange(g.size) for g in channels.groups}
    written = read.written(shrink_channels(read.model, keep_all, channels))
    for k, other in enumerate([tuple(shape), *others]):
        x = np.random.default_rng(k).normal(size=other).astype(np.float32)
        for a, b in zip(run(written, x), run(model, x)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_yolov8_style_detector_with_dynamic_batch_height_and_width():
    model = _dynamic_export(YOLOv8Style())
    assert {"Range", "Resize", "Shape"} <= {n.op_type for n in model.graph.node}
    # Without a size to analyse at, one line says exactly what to give.
    given = r"input_shapes=\{'input': \[1, 3, HEIGHT, WIDTH\]\} with your"
    with pytest.raises(BadInputError, match=given):
        load_model(model)
    reduced, report = reduce(model, budget="params=0.7", input_shapes={"input": SIZE_64},
                             progress=False)  # fmt: skip
    assert report.plan.reached["params"] <= 0.72
    check_model(reduced, full_check=True)
    ran = assert_runs_at_declared_shapes(model, reduced, SIZE_64)
    assert [r["input"] for r in ran] == [(1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 128, 128)]
    _keep_all_is_exact(model, SIZE_64, (2, 3, 128, 96))
    # The size it was made for, where the model records it, is the size analysed at
    # (test_passes_api_on_a_plainly_loaded_dynamic_model reduces such a model).
    recorded = load(_dynamic_export(YOLOv8Style(), imgsz=True))
    assert declared_dims(recorded.model)["input"] == SIZE_64
    assert_runs_at_declared_shapes(model, recorded.runnable, SIZE_64)


def test_folded_anchors_are_not_parameters():
    """The anchors and strides the head computes from the feature-map sizes fold to
    constants at a fixed size: they are not weights (issue 25: +252 here)."""
    torch.manual_seed(0)
    model = export_onnx(YOLOv8Style(), (1, 3, 64, 64), dynamic_batch=True, output_names=("y",))
    loaded = load_model(model)
    folded = {t.name for t in loaded.graph.initializer} - {t.name for t in model.graph.initializer}
    assert any(t.name in folded and t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2
               for t in loaded.graph.initializer)  # fmt: skip
    assert count_parameters(loaded) == count_parameters(model)
    reduced, report = reduce(model, budget="params=0.7", progress=False)
    assert report.plan.params[0] == count_parameters(model)
    assert report.plan.params[1] == count_parameters(reduced)


def test_space_to_depth_stem_keeps_dynamic_sizes():
    """TResNet's space-to-depth (Reshape-Transpose-Reshape over `x.size()`): the targets
    follow the image size with no constant form, so the written model computes them as
    the original does, also where the channels cut pass through one."""
    model = _dynamic_export(SpaceToDepthStem(), size=32)
    shape = [1, 3, 32, 32]
    # uniform cuts every group, the one through the space-to-depth included (MBS, which
    # now reads the stem's receptive fields, may leave that group whole at this budget)
    reduced, report = reduce(model, budget="params=0.7", input_shapes={"input": shape},
                             strategy="uniform", progress=False)  # fmt: skip
    assert report.plan.reached["params"] <= 0.72
    check_model(reduced, full_check=True)
    after = next(n for n in reduced.graph.node if n.name == "/body/body.1/conv/Conv")
    weight = next(t for t in reduced.graph.initializer if t.name == after.input[1])
    assert weight.dims[1] < 128  # cut through the space-to-depth between the convs
    ran = assert_runs_at_declared_shapes(model, reduced, shape)
    assert (2, 3, 64, 64) in [r["input"] for r in ran]
    _keep_all_is_exact(model, shape, (2, 3, 64, 48))


class _LiteralSpaceToDepth(torch.nn.Module):
    """Convs around a space-to-depth that writes its channel count as a number:
    `view(n, 16, h // 2, 2, w // 2, 2)`, and with `merged`, a view that merges that
    count with the height (`view(n, 16 * (h // 8), 8, w // 2, 2)`) and back."""

    def __init__(self, merged: bool = False) -> None:
        super().__init__()
        self.merged = merged
        self.a = torch.nn.Sequential(Conv(3, 16, 3), Conv(16, 16, 3))
        self.b = Conv(16 if merged else 64, 32, 3)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = self.a(x)
        n, _, h, w = x.size()
        if self.merged:
            x = torch.sigmoid(x.view(n, 16 * (h // 8), 8, w // 2, 2)).view(n, 16, h, w)
        else:
            x = x.view(n, 16, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous()
            x = x.view(n, 64, h // 2, w // 2)
        return self.head(self.b(x).mean((2, 3)))


def test_a_channel_count_written_as_a_number_follows_the_cut():
    """The cut changes the count the shape arithmetic writes as a number: the written model
    takes that entry from the cut and the entries that follow the size from the run-time
    arithmetic; where one entry does both, the cut is refused naming the Reshape."""
    shape = [1, 3, 32, 32]
    model = _dynamic_export(_LiteralSpaceToDepth(), size=32)
    read = load(model, {"input": shape})
    channels = analyze_channels(read.model)
    (group,) = [g for g in channels.groups if "/a/a.1/conv/Conv" in g.producers]
    cut = shrink_channels(read.model, {group.id: list(range(0, 16, 2))}, channels)
    written = read.written(cut)
    check_model(written, full_check=True)
    assert "Where" in {n.op_type for n in written.graph.node}
    assert_runs_at_declared_shapes(model, written, shape)

    merged = _dynamic_export(_LiteralSpaceToDepth(merged=True), size=32)
    read = load(merged, {"input": shape})
    channels = analyze_channels(read.model)
    (group,) = [g for g in channels.groups if "/a/a.1/conv/Conv" in g.producers]
    cut = shrink_channels(read.model, {group.id: list(range(8))}, channels)
    with pytest.raises(BadInputError, match=r"Reshape '/Reshape' reads a shape that follows"):
        read.written(cut)
    assert_runs_at_declared_shapes(merged, read.runnable, shape)  # uncut, it keeps them


def test_passes_api_on_a_plainly_loaded_dynamic_model(tmp_path):
    """`onnx.load` and the passes: every transform returns the declared inputs and outputs
    (dynamic batch, height and width), and a cut model runs at each shape they allow."""
    path = tmp_path / "detector.onnx"
    onnx.save(_dynamic_export(YOLOv8Style(), imgsz=True), path)
    raw = onnx.load(path)
    declared = declared_dims(raw)
    assert declared["input"] == [None, 3, None, None]
    channels = analyze_channels(raw)
    keep = {g.id: list(range(g.size * 3 // 4)) for g in channels.groups if not g.pinned}
    for shrunk in (shrink_channels(raw, keep, channels), ShrinkChannels(keep, channels)(raw).model):
        assert count_parameters(shrunk) < count_parameters(raw)
        check_model(shrunk, full_check=True)
        assert_runs_at_declared_shapes(raw, shrunk, SIZE_64)
    for transform in (NameNodes(), FoldShapes()):
        assert declared_dims(transform(raw).model) == declared, transform
    # Inference records what it proves (the detector's 4 + 8 rows), and no more.
    inferred = declared_dims(InferShapes(check_static=False)(raw).model)
    assert inferred == {**declared, "output": [None, 12, None]}
    reduced = MacroblockScaling(None, budget="params=0.7")(raw)
    assert reduced["mbs"].plan.reached["params"] <= 0.72
    check_model(reduced.model, full_check=True)
    assert_runs_at_declared_shapes(raw, reduced.model, SIZE_64)


def test_stale_recorded_shapes_are_inferred_afresh():
    """A model carrying the shapes of the size it was exported at, its input since made
    dynamic (as registry OCR models come): onnxruntime runs it at another size, and so
    does onnx-mbs, inferring the contradicted shapes again."""
    model = dynamic_input_model()
    recorded = onnx.shape_inference.infer_shapes(load(model, {"input": [1, 3, 24, 20]}).model)
    stale = onnx.ModelProto()
    stale.CopyFrom(model)
    stale.graph.value_info.extend(recorded.graph.value_info)
    shape = [1, 3, 32, 32]
    assert run(stale, np.zeros(shape, np.float32))[0].shape == (1, 5)
    options = dict(budget="params=0.7", channel_multiple=1, progress=False)
    reduced, report = reduce(stale, input_shapes={"input": shape}, **options)
    assert report.plan.reached["params"] <= 0.72
    check_model(reduced, full_check=True)
    assert_runs_at_declared_shapes(stale, reduced, shape)
    # Records that contradict each other (a batch of 7 beside a batch of 1: the full checker
    # refuses the input itself), nothing cut: the input as inferred afresh is written.
    clash = onnx.ModelProto()
    clash.CopyFrom(stale)
    clash.graph.value_info[-1].type.tensor_type.shape.dim[0].dim_value = 7
    with pytest.raises(onnx.shape_inference.InferenceError):
        check_model(clash, full_check=True)
    kept, report = reduce(clash, input_shapes={"input": shape}, **{**options, "budget": None})
    assert not report.plan.changes_anything
    check_model(kept, full_check=True)
    assert_runs_at_declared_shapes(clash, kept, shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(run(kept, x)[0], run(clash, x)[0], rtol=1e-5, atol=1e-6)
    # A declared output contradicted (a stale class count) is left dynamic where it is.
    output = stale.graph.output[0]
    output.CopyFrom(onnx.helper.make_tensor_value_info(output.name, 1, ["N", 7]))
    assert run(stale, np.zeros(shape, np.float32))[0].shape == (1, 5)
    reduced, _ = reduce(stale, input_shapes={"input": shape}, **options)
    check_model(reduced, full_check=True)
    assert declared_dims(reduced)["logits"] == [None, None]
    assert run(reduced, np.zeros([2, 3, 40, 24], np.float32))[0].shape == (2, 5)


def test_cli_reduce_then_retrain_keep_dynamic_sizes(tmp_path, capsys):
    """The written files of `reduce --input-shape` and `retrain` on it take every shape the
    original took: batch 1 and 2, another image size."""
    original = tmp_path / "stem.onnx"
    onnx.save(_dynamic_export(SpaceToDepthStem(), size=32), original)
    data = write_npz(tmp_path / "x.npz", **random_images(32, (3, 32, 32)))
    shape = ["--input-shape", "input:1,3,32,32"]
    small, tuned = tmp_path / "small.onnx", tmp_path / "tuned.onnx"
    args = ["--data", data, "--budget", "params=0.7", "--no-eval", *shape]
    assert main(["reduce", str(original), "-o", str(small), *args]) == 0
    args = ["--data", data, "--epochs", "1", "--device", "cpu", *shape]
    assert main(["retrain", str(small), "-o", str(tuned), *args]) == 0
    capsys.readouterr()
    for written in (small, tuned):
        check_model(onnx.load(written), full_check=True)
        assert_runs_at_declared_shapes(onnx.load(original), onnx.load(written), [1, 3, 32, 32])

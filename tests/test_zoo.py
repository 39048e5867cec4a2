"""The model zoo, its ONNX exports, the Fashion-MNIST trainer and the bundled files."""

from __future__ import annotations

import functools
import gzip
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import FMNIST_SAMPLE, FMNIST_TRAIN_SAMPLE, FORMS, SMALL_ZOO
from graphs import run
from torch import nn

from onnx_mbs.models import export as export_mod
from onnx_mbs.models import train as train_mod
from onnx_mbs.models.zoo import (
    ZOO,
    Bottleneck,
    ResNet,
    ShuffleNetV2,
    cifar_resnet,
    count_parameters,
    densenet_bc,
    resnet20,
)
from onnx_mbs.passes.errors import BadInputError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


@functools.cache
def build_meta(name: str) -> nn.Module:
    """Build on the meta device: shapes and parameter counts without memory or compute.

    Cached (ResNet-1202 takes seconds to build); callers must not modify the result.
    """
    with torch.device("meta"):
        return ZOO[name].build()


def conv_resolutions(model: nn.Module, shape: tuple[int, ...], device: str) -> list[int]:
    """Distinct output sizes of the Conv2d layers, largest first."""
    sizes: set[int] = set()

    def hook(_module, _inputs, output):
        h, w = output.shape[2:]
        assert h == w
        sizes.add(h)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.zeros(shape, device=device))
    for handle in handles:
        handle.remove()
    return sorted(sizes, reverse=True)


# --- definitions ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ZOO))
def test_output_shape_and_resolutions(name):
    entry = ZOO[name]
    model = build_meta(name)
    out = model.eval()(torch.zeros(entry.input_shape, device="meta"))
    assert tuple(out.shape) == (1, entry.num_classes)
    assert conv_resolutions(model, entry.input_shape, "meta") == entry.resolutions
    assert conv_resolutions(model, entry.test_input_shape, "meta") == entry.test_resolutions


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_small_models_run_on_cpu(name):
    entry = ZOO[name]
    torch.manual_seed(0)
    with torch.no_grad():
        out = entry.build().eval()(torch.randn((2,) + entry.test_input_shape[1:]))
    assert out.shape == (2, entry.num_classes)
    assert torch.isfinite(out).all()
    assert out.std() > 0


@pytest.mark.parametrize("name", ["resnet20", "resnet56", "densenet_bc", "mobilenet_v2"])
def test_grayscale_28x28_input(name):
    """Fashion-MNIST shape: one channel, 28x28, no resizing."""
    with torch.device("meta"):
        model = ZOO[name].build(num_classes=10, in_channels=1)
    assert model.eval()(torch.zeros(3, 1, 28, 28, device="meta")).shape == (3, 10)


def _conv(k: int, c_in: int, c_out: int) -> int:
    return k * k * c_in * c_out


def _bn(c: int) -> int:
    return 2 * c  # gamma and beta; running statistics are not parameters


def expected_cifar_resnet(depth: int, in_channels: int = 3, classes: int = 10) -> int:
    n = (depth - 2) // 6
    total = _conv(3, in_channels, 16) + _bn(16)
    c_in = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += _conv(3, c_in, width) + _bn(width) + _conv(3, width, width) + _bn(width)
            if c_in != width:  # 1x1 projection shortcut
                total += _conv(1, c_in, width) + _bn(width)
            c_in = width
    return total + 64 * classes + classes


def expected_bottleneck_resnet(
    blocks: list[int], widths: tuple[int, ...] = (64, 128, 256, 512), classes: int = 1000
) -> int:
    """torchvision's ResNet-50/101 layout: 7x7 stem, 1x1-3x3-1x1 blocks (expansion 4),
    a 1x1 projection on each stage's first block."""
    total = _conv(7, 3, widths[0]) + _bn(widths[0])
    c_in = widths[0]
    for n, planes in zip(blocks, widths):
        for _ in range(n):
            total += (
                _conv(1, c_in, planes) + _conv(3, planes, planes) + _conv(1, planes, 4 * planes)
            )
            total += 2 * _bn(planes) + _bn(4 * planes)
            if c_in != 4 * planes:
                total += _conv(1, c_in, 4 * planes) + _bn(4 * planes)
            c_in = 4 * planes
    return total + c_in * classes + classes


def expected_densenet_bc(depth: int, k: int, classes: int = 10) -> int:
    n = (depth - 4) // 6
    c = 2 * k
    total = _conv(3, 3, c)
    for block in range(3):
        for _ in range(n):
            total += _bn(c) + _conv(1, c, 4 * k) + _bn(4 * k) + _conv(3, 4 * k, k)
            c += k
        if block < 2:
            total += _bn(c) + _conv(1, c, c // 2)
            c //= 2
    return total + _bn(c) + c * classes + classes


def expected_shufflenet_v1(g: int = 3, widths=(240, 480, 960), classes: int = 1000) -> int:
    """Zhang et al. 2018, Table 1: units of grouped 1x1 (to a quarter width), 3x3 depthwise,
    grouped 1x1; a stride-2 unit's branch makes only the added channels."""
    total = _conv(3, 3, 24) + _bn(24)
    c_in = 24
    for stage, (repeats, c_out) in enumerate(zip((4, 8, 4), widths)):
        for unit in range(repeats):
            mid = c_out // 4
            made = c_out - c_in if unit == 0 else c_out
            first_groups = 1 if stage == unit == 0 else g
            total += _conv(1, c_in, mid) // first_groups + _bn(mid)
            total += _conv(3, 1, mid) + _bn(mid) + _conv(1, mid, made) // g + _bn(made)
            c_in = c_out
    return total + c_in * classes + classes


def test_shufflenet_v1_parameter_count():
    assert count_parameters(build_meta("shufflenet_v1")) == expected_shufflenet_v1()


@pytest.mark.parametrize(
    ("name", "depth", "published"),
    [
        ("resnet20", 20, 0.27e6),
        ("resnet56", 56, 0.85e6),
        ("resnet110", 110, 1.7e6),
        pytest.param("resnet1202", 1202, 19.4e6, marks=pytest.mark.slow),  # 90 s to build
    ],
)
def test_cifar_resnet_parameter_counts(name, depth, published):
    count = count_parameters(build_meta(name))
    assert count == expected_cifar_resnet(depth)
    assert count == pytest.approx(published, rel=0.03)  # He et al. 2016, Table 6


def test_cifar_resnet_grayscale_parameter_count():
    assert count_parameters(resnet20(in_channels=1)) == expected_cifar_resnet(20, in_channels=1)


def test_densenet_bc_parameter_counts():
    assert count_parameters(build_meta("densenet_bc")) == expected_densenet_bc(40, 12)
    with torch.device("meta"):
        bc100 = densenet_bc(depth=100, growth_rate=12)
    assert count_parameters(bc100) == expected_densenet_bc(100, 12)
    assert count_parameters(bc100) == pytest.approx(0.8e6, rel=0.05)  # Huang et al., Table 2


@pytest.mark.parametrize(
    ("name", "published"),
    [  # the parameter counts torchvision publishes for these architectures
        ("resnet18", 11_689_512),
        pytest.param("resnet50", 25_557_032, marks=pytest.mark.slow),  # stand-in below
        pytest.param("resnet101", 44_549_160, marks=pytest.mark.slow),
        ("mobilenet_v1", 4_231_976),  # Keras' MobileNet 1.0 (paper: 4.2M)
        ("mobilenet_v2", 3_504_872),
        ("shufflenet_v2", 2_278_604),
    ],
)
def test_imagenet_parameter_counts(name, published):
    assert count_parameters(build_meta(name)) == published


def test_bottleneck_resnet_counts_small_stand_in():
    """What the slow ResNet-50/101 counts check, fast: the layout formula gives the
    published counts, and a one-block-per-stage bottleneck ResNet built by the zoo
    has exactly the formula's count."""
    assert expected_bottleneck_resnet([3, 4, 6, 3]) == 25_557_032  # torchvision resnet50
    assert expected_bottleneck_resnet([3, 4, 23, 3]) == 44_549_160  # resnet101
    widths = (8, 16, 32, 64)
    with torch.device("meta"):
        small = ResNet(Bottleneck, [1, 1, 1, 1], list(widths), 10, 3, True)
    assert count_parameters(small) == expected_bottleneck_resnet([1, 1, 1, 1], widths, 10)


def test_count_parameters_excludes_running_stats():
    assert count_parameters(nn.BatchNorm2d(7)) == 14


def test_bad_architecture_arguments():
    with pytest.raises(BadInputError, match="6n\\+2"):
        cifar_resnet(21)
    with pytest.raises(BadInputError, match="width"):
        ZOO["shufflenet_v2"].build(width=0.7)
    with pytest.raises(BadInputError, match="unknown zoo model"):
        export_mod.export_zoo("resnet21")


# --- export ---------------------------------------------------------------------------------


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    scale = float(np.abs(expected).max())
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", SMALL_ZOO)
def test_export_matches_torch(zoo_onnx, name, form):
    entry = ZOO[name]
    proto = zoo_onnx(name, form)
    onnx.checker.check_model(proto, full_check=True)
    assert proto.opset_import[0].version == export_mod.OPSET
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert tuple(dims) == entry.test_input_shape

    x = np.random.default_rng(1).standard_normal(entry.test_input_shape).astype(np.float32)
    with torch.no_grad():
        expected = export_mod.build_zoo_model(name, seed=0)(torch.from_numpy(x)).numpy()
    assert_close(run(proto, {"input": x}, ["logits"])[0], expected)


def _producers(proto: onnx.ModelProto) -> dict[str, str]:
    return {out: node.op_type for node in proto.graph.node for out in node.output}


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_train_form_keeps_batchnorm_deploy_folds_it(zoo_onnx, name):
    train, deploy = zoo_onnx(name, "train"), zoo_onnx(name, "deploy")
    train_bn = [n for n in train.graph.node if n.op_type == "BatchNormalization"]
    modules = build_meta(name).modules()
    assert len(train_bn) == sum(isinstance(m, nn.BatchNorm2d) for m in modules)
    for node in train_bn:  # inference semantics: one output, not training mode
        assert len(node.output) == 1
        assert all(a.i == 0 for a in node.attribute if a.name == "training_mode")

    # Deploy form: every BN that is a Conv's only consumer is folded; the others
    # (DenseNet's pre-activation BNs) cannot be, and stay.
    producers = _producers(train)
    consumers = Counter(name for n in train.graph.node for name in n.input)
    foldable = sum(producers[n.input[0]] == "Conv" and consumers[n.input[0]] == 1 for n in train_bn)
    deploy_bn = [n for n in deploy.graph.node if n.op_type == "BatchNormalization"]
    assert len(deploy_bn) == len(train_bn) - foldable
    if name != "densenet_bc":
        assert foldable == len(train_bn) and not deploy_bn
    convs = Counter(n.op_type for n in train.graph.node)["Conv"]
    assert Counter(n.op_type for n in deploy.graph.node)["Conv"] == convs


def test_batchnorm_is_randomized_and_seeded():
    a = export_mod.build_zoo_model("resnet20", seed=0)
    b = export_mod.build_zoo_model("resnet20", seed=0)
    c = export_mod.build_zoo_model("resnet20", seed=1)
    bn = a.stem[1]
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
    assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
    assert bn.running_mean.abs().max() > 0 and bn.bias.abs().max() > 0
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)


def test_shufflenet_export_has_shuffle_and_split(zoo_onnx):
    proto = zoo_onnx("shufflenet_v2", "deploy")
    producers = _producers(proto)
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    shuffles = [  # Reshape -> Transpose -> Reshape
        n
        for n in proto.graph.node
        if n.op_type == "Transpose"
        and producers[n.input[0]] == "Reshape"
        and consumers[n.output[0]] == ["Reshape"]
    ]
    assert len(shuffles) == sum(ShuffleNetV2.REPEATS)  # one channel shuffle per unit
    ops = {n.op_type for n in proto.graph.node}
    assert ("Split" in ops or "Slice" in ops) and "Concat" in ops


def test_export_does_not_touch_model_and_dynamic_batch(tmp_path):
    model = export_mod.build_zoo_model("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "r20.onnx"
    proto = export_mod.export_onnx(model, (1, 3, 32, 32), path, "train", dynamic_batch=True)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert onnx.load(str(path)).graph.node == proto.graph.node
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    assert_close(run(proto, {"input": x}, ["logits"])[0], expected)


def _bn_params_are_initializers(proto: onnx.ModelProto) -> bool:
    weights = {init.name for init in proto.graph.initializer}
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    return bool(bns) and all(name in weights for n in bns for name in n.input[1:])


def test_equal_weights_stay_separate_initializers():
    """Trained residual blocks have equal BN biases; the exporter must not merge them."""
    model = resnet20()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.fill_(0.5)
    proto = export_mod.export_onnx(model, (1, 3, 32, 32), form="train")
    assert [i.name for i in proto.graph.input] == ["input"]
    assert "Identity" not in {n.op_type for n in proto.graph.node}
    assert _bn_params_are_initializers(proto)


def test_export_rejects_unknown_form():
    with pytest.raises(BadInputError, match="form"):
        export_mod.export_onnx(nn.Conv2d(1, 1, 1), (1, 1, 4, 4), form="folded")


def test_export_cli(tmp_path, capsys):
    out = tmp_path / "r20.onnx"
    assert export_mod.main(["resnet20", "--form", "train", "-o", str(out)]) == 0
    proto = onnx.load(str(out))
    assert any(n.op_type == "BatchNormalization" for n in proto.graph.node)
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    assert export_mod.main(["nosuchnet", "-o", str(out)]) == 2
    assert "unknown zoo model" in capsys.readouterr().err
    assert export_mod.main(["resnet20", "--input-shape", "1,3,32"]) == 2


# --- training helpers ----------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx(tmp_path, gz):
    array = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    data = _idx_bytes(array)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    path.write_bytes(gzip.compress(data) if gz else data)
    np.testing.assert_array_equal(train_mod.read_idx(path), array)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00")
    with pytest.raises(BadInputError, match="IDX"):
        train_mod.read_idx(path)


def test_load_fashion_mnist_missing_folder(tmp_path):
    with pytest.raises(BadInputError, match="dataset-fashion-mnist"):
        train_mod.load_fashion_mnist("train", tmp_path)


def test_augment_is_a_shifted_or_flipped_crop():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(1, 256, size=(16, 1, 8, 8), dtype=np.uint8))
    out = train_mod.augment(x, np.random.default_rng(3), pad=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], c) for c in crops)
        flipped = any(torch.equal(out[i], c.flip(2)) for c in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < len(x)


def test_channel_stats_and_normalize():
    x = np.array([0, 255], dtype=np.uint8).reshape(2, 1, 1, 1)
    mean, std = train_mod.channel_stats(x)
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.5])
    out = train_mod.normalize(torch.from_numpy(x), mean, std)
    assert out.flatten().tolist() == pytest.approx([-1.0, 1.0])


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 10),
    )


def test_train_model_learns_and_is_seeded(fmnist_train_sample, fmnist_sample):
    mean, std = train_mod.channel_stats(fmnist_train_sample[0])
    results, states = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = _tiny_cnn()
        top1 = train_mod.train_model(
            model, fmnist_train_sample, fmnist_sample, mean=mean, std=std,
            epochs=2, lr=0.05, seed=5, log=lambda _msg: None,
        )  # fmt: skip
        results.append(top1)
        states.append(model.state_dict())
    assert results[0] == results[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert results[0] >= 0.6  # chance is 0.1
    assert train_mod.evaluate(model, fmnist_sample, mean, std) == results[0]


def test_with_metadata_returns_a_copy():
    proto = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    proto.metadata_props.add(key="a", value="1")
    out = train_mod.with_metadata(proto, {"a": "2", "b": "3"})
    assert {p.key: p.value for p in out.metadata_props} == {"a": "2", "b": "3"}
    assert {p.key: p.value for p in proto.metadata_props} == {"a": "1"}


# --- bundled files -------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "count"), [(FMNIST_SAMPLE, 512), (FMNIST_TRAIN_SAMPLE, 2048)])
def test_bundled_samples(path, count):
    assert path.stat().st_size < 1_000_000
    with np.load(path) as data:
        x, y = data["x"], data["y"]
    assert x.dtype == np.uint8 and x.shape == (count, 1, 28, 28)
    assert y.dtype == np.int64 and y.shape == (count,)
    assert x.max() == 255  # raw pixels, not normalised
    assert set(np.unique(y)) == set(range(10))


@pytest.mark.skipif(not FMNIST_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_bundled_samples_are_the_first_images_of_each_split(fmnist_sample, fmnist_train_sample):
    for split, (x, y) in (("test", fmnist_sample), ("train", fmnist_train_sample)):
        full_x, full_y = train_mod.load_fashion_mnist(split)
        np.testing.assert_array_equal(x, full_x[: len(x)])
        np.testing.assert_array_equal(y, full_y[: len(y)])


def test_bundled_model_accuracy(bundled_model_path, fmnist_sample):
    assert bundled_model_path.stat().st_size < 1_200_000  # 272k float32 weights
    proto = onnx.load(str(bundled_model_path))
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["onnx_mbs.dataset"] == "fashion-mnist"
    mean = [float(v) for v in meta["onnx_mbs.mean"].split(",")]
    std = [float(v) for v in meta["onnx_mbs.std"].split(",")]
    assert len(mean) == len(std) == 1 and 0 < mean[0] < 1 and 0 < std[0] < 1
    assert float(meta["onnx_mbs.test_top1"]) >= 0.85
    assert _bn_params_are_initializers(proto)
    assert [i.name for i in proto.graph.input] == ["input"]

    x, y = fmnist_sample
    inputs = ((x.astype(np.float32) / 255.0 - mean[0]) / std[0]).astype(np.float32)
    logits = run(proto, {"input": inputs}, ["logits"])[0]
    assert logits.shape == (512, 10)
    assert (logits.argmax(1) == y).mean() >= 0.8

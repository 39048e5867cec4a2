"""Macroblock analysis against independent counts on every zoo model, in both export forms."""

from __future__ import annotations

import functools

import onnx
import pytest
import torch
from onnx_mbs.models.export import export_onnx, randomize_batchnorm
from onnx_mbs.models.zoo import ZOO
from onnx_mbs.passes import analyze_model, load_model


@functools.cache
def _zoo(name: str, form: str) -> tuple[torch.nn.Module, onnx.ModelProto]:
    entry = ZOO[name]
    # Random BN values: the exporter shares equal initializers (e.g. all-ones scales).
    module = randomize_batchnorm(entry.build()).eval()
    return module, load_model(export_onnx(module, entry.input_shape, form=form))


def _hook_macs(module: torch.nn.Module, input_shape) -> int:
    """MACs counted by torch forward hooks: what the layers really compute."""
    total = 0

    def conv_hook(layer, _, out):
        nonlocal total
        kh, kw = layer.kernel_size
        total += out.numel() * kh * kw * layer.in_channels // layer.groups

    def linear_hook(layer, inp, out):
        nonlocal total
        total += out.numel() * layer.in_features

    handles = [
        m.register_forward_hook(conv_hook if isinstance(m, torch.nn.Conv2d) else linear_hook)
        for m in module.modules()
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    with torch.no_grad():
        module(torch.zeros(input_shape))
    for h in handles:
        h.remove()
    return total


def _bn_channels(model: onnx.ModelProto) -> int:
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    return sum(shapes[n.input[1]][0] for n in model.graph.node if n.op_type == "BatchNormalization")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_counts_and_resolutions(name):
    entry = ZOO[name]
    module, train = _zoo(name, "train")
    _, deploy = _zoo(name, "deploy")
    torch_params = sum(p.numel() for p in module.parameters())
    macs = _hook_macs(module, entry.input_shape)
    for form, model in (("train", train), ("deploy", deploy)):
        analysis = analyze_model(model)
        if form == "train":
            assert analysis.total_params == torch_params
        else:
            # Folding a BN into its conv turns 2C BN parameters into a C-element conv bias.
            folded = _bn_channels(train) - _bn_channels(model)
            assert folded > 0
            assert analysis.total_params == torch_params - folded
        assert analysis.total_macs == macs, form
        assert [m.resolution[0] for m in analysis.macroblocks] == entry.resolutions, form
        assert sum(len(m.layers) for m in analysis.macroblocks) == sum(
            isinstance(m, torch.nn.Conv2d) for m in module.modules()
        )
        for block in analysis.macroblocks:
            assert block.base_layers[0] == block.layers[0]
            assert set(block.base_layers) <= set(block.layers)


def test_cifar_resnet_bases_follow_receptive_fields():
    """ResNet-56 at 32x32: 3x3 convs add 2 to the local RF; the base ends once it passes 32."""
    _, model = _zoo("resnet56", "deploy")
    analysis = analyze_model(model)
    first, second, third = analysis.macroblocks
    # Stem conv at RF 3, then each conv +2: RF 3..31 fits 32 -> 15 layers.
    assert len(first.base_layers) == 15
    # Entering 16x16: stride-2 3x3 starts at 1 + 2/2 = 2, 1x1 shortcut at 1; +2 per conv
    # up to 16 -> the entering pair, the shortcut, and 6 more convs.
    assert len(second.base_layers) == 9
    assert len(third.base_layers) == 5
    rf = {x.name: x.receptive_field for x in analysis.layers}
    assert rf[second.layers[0]] == 2.0
    assert all(rf[n] <= 16 for n in second.base_layers)
    assert all(rf[n] > 16 for n in set(second.layers) - set(second.base_layers))

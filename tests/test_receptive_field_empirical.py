"""Receptive fields in input pixels against the empirical ones, on zoo models through the bridge.

The empirical receptive field of a conv layer: the input pixels whose gradient is non-zero
for one output pixel (summed over its channels, union over a batch of random images, so a
ReLU that is off or a max-pool that picks another pixel for one image does not hide a pixel).
Every zoo model here pads its windows symmetrically, so the output pixel p of a layer with
step j sees the square centred on input pixel p*j: where that square lies inside the image,
its side must equal the analysis' field; where it reaches past the image, the border
cuts it.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from onnx import helper

from onnx_mbs.bridge import OnnxModule
from onnx_mbs.models.export import export_zoo
from onnx_mbs.passes import analyze_model, load_model


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return probe


@pytest.mark.slow  # about 20 s per model on 2 busy cores: one backward pass per conv layer
@pytest.mark.parametrize(
    ("name", "size"), [("resnet20", 64), ("mobilenet_v1", 96), ("shufflenet_v1", 96)]
)
def test_receptive_field_matches_input_gradients(name, size):
    model = load_model(export_zoo(name, "deploy", (1, 3, size, size)))
    analysis = analyze_model(model)
    layers = analysis.layers
    module = OnnxModule(_with_outputs(model, [x.output for x in layers])).eval()
    module.requires_grad_(False)  # only input gradients are needed
    torch.manual_seed(0)
    x = torch.randn(4, 3, size, size, requires_grad=True)
    outputs = module(x)
    unclipped = 0
    for layer, out in zip(layers, outputs, strict=True):
        h, w = out.shape[2:]
        p = (h // 2, w // 2)
        (grad,) = torch.autograd.grad(out[:, :, p[0], p[1]].sum(), x, retain_graph=True)
        rows, cols = torch.nonzero(grad.abs().sum(dim=(0, 1)), as_tuple=True)
        extent = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
        rf = layer.global_receptive_field
        centre, reach = p[0] * size / h, (rf - 1) / 2
        # The square centred on p*j, cut by the image border where it reaches past it.
        expected = min(size - 1, centre + reach) - max(0, centre - reach) + 1
        assert extent == (expected, expected), (layer.name, extent, rf)
        unclipped += rf == expected
    assert unclipped >= len(layers) // 4  # many layers are compared unclipped

"""PyTorch CNNs (no torchvision) used as MBS inputs, plus a registry describing them.

The definitions follow the original papers (and torchvision's layouts for the
ImageNet models, so parameter counts match the published ones). They exist to
produce ONNX graphs with the structures MBS must handle: residual adds,
projection shortcuts, bottlenecks, depthwise convs, channel split/shuffle and
concat growth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from onnx_mbs.passes.errors import BadInputError


def conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, relu: bool = True
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ ReLU): the unit every post-activation CNN here is made of."""
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _init_weights(model: nn.Module) -> nn.Module:
    """He init for convs, identity BN, small linear: the usual starting point for training."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model


# ---------------------------------------------------------------------------
# ResNets (He et al. 2016)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity, or 1x1 conv+BN projection, shortcut."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = conv_bn(c_in, planes, 3, stride)
        self.conv2 = conv_bn(planes, c_out, 3, relu=False)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as in torchvision's v1.5), 1x1 expand x4."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = conv_bn(c_in, planes, 1)
        self.conv2 = conv_bn(planes, planes, 3, stride)
        self.conv3 = conv_bn(planes, c_out, 1, relu=False)
        self.shortcut = _shortcut(c_in, c_out, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv3(self.conv2(self.conv1(x))) + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return conv_bn(c_in, c_out, 1, stride, relu=False)


class ResNet(nn.Module):
    """Stem, stages of residual blocks (first block of a stage strides), global pool, linear."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: list[int],
        widths: list[int],
        num_classes: int,
        in_channels: int,
        imagenet_stem: bool,
    ) -> None:
        super().__init__()
        if imagenet_stem:
            self.stem = nn.Sequential(conv_bn(in_channels, widths[0], 7, 2), nn.MaxPool2d(3, 2, 1))
        else:
            self.stem = conv_bn(in_channels, widths[0], 3)
        stages = []
        c_in = widths[0]
        for i, (n, planes) in enumerate(zip(blocks_per_stage, widths, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(c_in, planes, stride))
                c_in = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-depth for 32x32 inputs: 3 stages of 16/32/64 channels, (depth-2)/6 blocks each."""
    if depth < 8 or (depth - 2) % 6:
        raise BadInputError(f"CIFAR ResNet depth must be 6n+2 (20, 56, 110, ...), got {depth}")
    n = (depth - 2) // 6
    return ResNet(BasicBlock, [n, n, n], [16, 32, 64], num_classes, in_channels, False)


def resnet20(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return cifar_resnet(20, num_classes, in_channels)


def resnet56(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return cifar_resnet(56, num_classes, in_channels)


def resnet110(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return cifar_resnet(110, num_classes, in_channels)


def resnet1202(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return cifar_resnet(1202, num_classes, in_channels)


def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], num_classes, in_channels, True)


def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], num_classes, in_channels, True)


def resnet101(num_classes: int = 1000, in_channels: int = 3) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 23, 3], [64, 128, 256, 512], num_classes, in_channels, True)


# ---------------------------------------------------------------------------
# MobileNet v1 (Howard et al. 2017)


class MobileNetV1(nn.Module):
    """A 3x3 stride-2 conv, then 13 depthwise-separable pairs (3x3 depthwise, 1x1 pointwise,
    each with BN and ReLU); no residuals. (output channels, depthwise stride), Table 1."""

    SETTINGS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)]
    SETTINGS += [(512, 1)] * 5 + [(1024, 2), (1024, 1)]

    def __init__(self, num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_bn(in_channels, 32, 3, 2)]
        c_in = 32
        for c_out, stride in self.SETTINGS:
            layers += [conv_bn(c_in, c_in, 3, stride, groups=c_in), conv_bn(c_in, c_out, 1)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


def mobilenet_v1(num_classes: int = 1000, in_channels: int = 3) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels)


# ---------------------------------------------------------------------------
# MobileNetV2 (Sandler et al. 2018)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of 8, never dropping more than 10% (torchvision rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu6(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1):
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6), 3x3 depthwise (ReLU6), linear 1x1 project; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn_relu6(c_in, hidden, 1))
        layers.append(conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden))
        layers.append(conv_bn(hidden, c_out, 1, relu=False))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    # expansion t, output channels c, repeats n, first stride s (Table 2 of the paper)
    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        if width <= 0:
            raise BadInputError(f"MobileNetV2 width must be positive, got {width}")
        c_in = _make_divisible(32 * width)
        last = _make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [conv_bn_relu6(in_channels, c_in, 3, 2)]
        for t, c, n, s in self.SETTINGS:
            c_out = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers.append(conv_bn_relu6(c_in, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> MobileNetV2:
    return MobileNetV2(num_classes, width, in_channels)


# ---------------------------------------------------------------------------
# ShuffleNetV2 (Ma et al. 2018)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channel groups as view/transpose/view, so ONNX gets Reshape-Transpose-Reshape."""
    _, c, h, w = x.shape
    x = x.view(-1, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(-1, c, h, w)


class ShuffleUnit(nn.Module):
    """Stride 1: split channels, transform one half. Stride 2: transform both, doubling width."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.half = half = c_out // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                conv_bn(c_in, c_in, 3, stride, groups=c_in, relu=False),
                conv_bn(c_in, half, 1),
            )
        else:
            self.branch1 = nn.Identity()
        branch2_in = c_in if stride > 1 else half
        self.branch2 = nn.Sequential(
            conv_bn(branch2_in, half, 1),
            conv_bn(half, half, 3, stride, groups=half, relu=False),
            conv_bn(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            a, b = torch.split(x, [self.half, self.half], dim=1)
            out = torch.cat((a, self.branch2(b)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    STAGE_CHANNELS = {
        0.5: [24, 48, 96, 192, 1024],
        1.0: [24, 116, 232, 464, 1024],
        1.5: [24, 176, 352, 704, 1024],
        2.0: [24, 244, 488, 976, 2048],
    }
    REPEATS = [4, 8, 4]

    def __init__(self, num_classes: int = 1000, width: float = 1.0, in_channels: int = 3) -> None:
        super().__init__()
        if width not in self.STAGE_CHANNELS:
            raise BadInputError(
                f"ShuffleNetV2 width must be one of {sorted(self.STAGE_CHANNELS)}, got {width}"
            )
        channels = self.STAGE_CHANNELS[width]
        self.stem = nn.Sequential(conv_bn(in_channels, channels[0], 3, 2), nn.MaxPool2d(3, 2, 1))
        stages = []
        c_in = channels[0]
        for repeats, c_out in zip(self.REPEATS, channels[1:4], strict=True):
            units = [ShuffleUnit(c_in, c_out, 2)]
            units += [ShuffleUnit(c_out, c_out, 1) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.conv5 = conv_bn(c_in, channels[4], 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[4], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.conv5(self.stages(self.stem(x))))
        return self.fc(torch.flatten(x, 1))


def shufflenet_v2(
    num_classes: int = 1000, width: float = 1.0, in_channels: int = 3
) -> ShuffleNetV2:
    return ShuffleNetV2(num_classes, width, in_channels)


# ---------------------------------------------------------------------------
# ShuffleNet v1 (Zhang et al. 2018), 1x with g = 3


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 to a quarter width, channel shuffle, 3x3 depthwise, grouped 1x1.

    Stride 1 adds the input; stride 2 concatenates a 3x3 average pool of the input, so
    the branch makes only the channels the stage adds. The first unit of the network
    reads 24 channels and keeps its first 1x1 ungrouped, as in the paper.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, first: bool) -> None:
        super().__init__()
        self.stride, self.groups = stride, groups
        mid = c_out // 4
        made = c_out - c_in if stride > 1 else c_out
        self.reduce = conv_bn(c_in, mid, 1, groups=1 if first else groups)
        self.depthwise = conv_bn(mid, mid, 3, stride, groups=mid, relu=False)
        self.expand = conv_bn(mid, made, 1, groups=groups, relu=False)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(self.depthwise(channel_shuffle(self.reduce(x), self.groups)))
        if self.pool is None:
            return self.relu(x + y)
        return torch.cat((self.pool(x), self.relu(y)), dim=1)


class ShuffleNetV1(nn.Module):
    STAGE_CHANNELS = {3: [240, 480, 960]}  # 1x width, g = 3: the paper's headline setting
    REPEATS = [4, 8, 4]

    def __init__(self, num_classes: int = 1000, groups: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        if groups not in self.STAGE_CHANNELS:
            raise BadInputError(
                f"ShuffleNetV1 groups must be one of {sorted(self.STAGE_CHANNELS)}, got {groups}"
            )
        self.stem = nn.Sequential(conv_bn(in_channels, 24, 3, 2), nn.MaxPool2d(3, 2, 1))
        units: list[nn.Module] = []
        c_in = 24
        for stage, (repeats, c_out) in enumerate(zip(self.REPEATS, self.STAGE_CHANNELS[groups])):
            units.append(ShuffleV1Unit(c_in, c_out, 2, groups, first=stage == 0))
            units += [ShuffleV1Unit(c_out, c_out, 1, groups, False) for _ in range(repeats - 1)]
            c_in = c_out
        self.stages = nn.Sequential(*units)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def shufflenet_v1(num_classes: int = 1000, in_channels: int = 3) -> ShuffleNetV1:
    return ShuffleNetV1(num_classes, 3, in_channels)


# ---------------------------------------------------------------------------
# DenseNet-BC (Huang et al. 2017), CIFAR variant


class DenseLayer(nn.Module):
    """Pre-activation bottleneck: BN-ReLU-1x1 (4k) then BN-ReLU-3x3 (k); output concatenated."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(c_in),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_in, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth),
            nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.body(x)), dim=1)


def _transition(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.BatchNorm2d(c_in),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.AvgPool2d(2),
    )


class DenseNetBC(nn.Module):
    def __init__(
        self, depth: int = 40, growth_rate: int = 12, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise BadInputError(f"DenseNet-BC depth must be 6n+4 (40, 100, ...), got {depth}")
        n = (depth - 4) // 6
        c = 2 * growth_rate
        layers: list[nn.Module] = [nn.Conv2d(in_channels, c, 3, padding=1, bias=False)]
        for block in range(3):
            for _ in range(n):
                layers.append(DenseLayer(c, growth_rate))
                c += growth_rate
            if block < 2:
                layers.append(_transition(c, c // 2))
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.fc(torch.flatten(x, 1))


def densenet_bc(
    depth: int = 40, growth_rate: int = 12, num_classes: int = 10, in_channels: int = 3
) -> DenseNetBC:
    return DenseNetBC(depth, growth_rate, num_classes, in_channels)


# ---------------------------------------------------------------------------
# Registry


# ---------------------------------------------------------------------------
# Detection and dense-map graphs (not classifiers): what deployment ONNX files often are


def _stages(c_in: int, widths: list[int]) -> nn.ModuleList:
    """Stride-2 stages of two conv_bn units each: the backbone of the two graphs below."""
    stages, prev = [], c_in
    for w in widths:
        stages.append(nn.Sequential(conv_bn(prev, w, 3, 2), conv_bn(w, w, 3)))
        prev = w
    return nn.ModuleList(stages)


class YoloTiny(nn.Module):
    """YOLO-style detector: a stride-32 backbone, a top-down neck with Concat, and a 1x1 head per
    scale (strides 8, 16, 32) decoded as YOLOv5 does -- view to (batch, anchors, 5 + classes, H,
    W), Sigmoid, Split into xy / wh / scores, scale, Concat -- into one (batch, boxes, 5 +
    classes) output. Grid offsets are left out: the graph structure is the point."""

    def __init__(
        self, num_classes: int = 4, in_channels: int = 3, width: int = 16, anchors: int = 3
    ) -> None:
        super().__init__()
        w = width
        self.backbone = _stages(in_channels, [w, 2 * w, 4 * w, 8 * w, 8 * w])
        self.lat5 = conv_bn(8 * w, 4 * w, 1)
        self.fuse4 = conv_bn(8 * w + 4 * w, 4 * w, 3)
        self.lat4 = conv_bn(4 * w, 2 * w, 1)
        self.fuse3 = conv_bn(4 * w + 2 * w, 2 * w, 3)
        self.anchors, self.outputs = anchors, 5 + num_classes
        self.heads = nn.ModuleList(
            nn.Conv2d(c, anchors * self.outputs, 1) for c in (2 * w, 4 * w, 8 * w)
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for stage in self.backbone:
            x = stage(x)
            features.append(x)
        c3, c4, c5 = features[2:]
        up = nn.functional.interpolate
        p4 = self.fuse4(torch.cat([c4, up(self.lat5(c5), scale_factor=2.0)], 1))
        p3 = self.fuse3(torch.cat([c3, up(self.lat4(p4), scale_factor=2.0)], 1))
        boxes = []
        for p, head, stride in zip((p3, p4, c5), self.heads, (8, 16, 32), strict=True):
            y = head(p)
            b, _, h, w = y.shape
            y = y.view(b, self.anchors, self.outputs, h, w).permute(0, 1, 3, 4, 2).sigmoid()
            xy, wh, scores = y.split((2, 2, self.outputs - 4), dim=-1)
            y = torch.cat((xy * (2.0 * stride), (wh * 2.0) ** 2 * stride, scores), -1)
            boxes.append(y.reshape(b, -1, self.outputs))
        return torch.cat(boxes, 1)


class DBNetTiny(nn.Module):
    """DBNet-style text detector: backbone, FPN (1x1 laterals, upsample-and-add, 3x3 smoothing,
    upsample to 1/4 and Concat), and two heads (3x3 conv_bn, two stride-2 ConvTransposes, Sigmoid)
    giving a probability map and a threshold map at the input size."""

    def __init__(self, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = width
        widths = [w, 2 * w, 4 * w, 8 * w, 8 * w]
        self.backbone = _stages(in_channels, widths)
        inner = 4 * w
        self.laterals = nn.ModuleList(nn.Conv2d(c, inner, 1, bias=False) for c in widths[1:])
        self.smooth = nn.ModuleList(
            nn.Conv2d(inner, w, 3, padding=1, bias=False) for _ in widths[1:]
        )
        self.prob = self._head(4 * w, w)
        self.thresh = self._head(4 * w, w)
        _init_weights(self)

    @staticmethod
    def _head(c_in: int, c: int) -> nn.Sequential:
        return nn.Sequential(
            conv_bn(c_in, c, 3),
            nn.ConvTranspose2d(c, c, 2, 2),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c, 1, 2, 2),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        for stage in self.backbone:
            x = stage(x)
            features.append(x)
        up = nn.functional.interpolate
        lat = [conv(f) for conv, f in zip(self.laterals, features[1:], strict=True)]
        for i in range(len(lat) - 2, -1, -1):
            lat[i] = lat[i] + up(lat[i + 1], scale_factor=2.0)
        maps = [
            up(conv(f), scale_factor=float(2**i)) if i else conv(f)
            for i, (conv, f) in enumerate(zip(self.smooth, lat, strict=True))
        ]
        fused = torch.cat(maps[::-1], 1)
        return self.prob(fused), self.thresh(fused)


@dataclass(frozen=True)
class HeadEntry:
    """A detection or dense-map zoo graph: how to build it and what its ONNX outputs are named."""

    name: str
    build: Callable[..., nn.Module]
    input_shape: tuple[int, int, int, int]
    outputs: tuple[str, ...]


HEADS: dict[str, HeadEntry] = {
    e.name: e
    for e in [
        HeadEntry("yolo_tiny", YoloTiny, (1, 3, 64, 64), ("detections",)),
        HeadEntry("dbnet_tiny", DBNetTiny, (1, 3, 64, 64), ("prob", "thresh")),
    ]
}


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model and what MBS should find in it.

    `resolutions` are the macroblock output sizes at `input_shape`, largest
    first; `test_resolutions` the same at `test_input_shape` (the cheaper
    shape tests export at). `small` marks models cheap enough to export and run
    in tests at `test_input_shape`.
    """

    name: str
    build: Callable[..., nn.Module]  # () -> default model; accepts num_classes=, in_channels=
    input_shape: tuple[int, int, int, int]
    test_input_shape: tuple[int, int, int, int]
    small: bool
    resolutions: list[int]
    test_resolutions: list[int] = field(default_factory=list)
    num_classes: int = 1000


CIFAR = (1, 3, 32, 32)
IMAGENET = (1, 3, 224, 224)
IMAGENET_TEST = (1, 3, 64, 64)
# Stem stride 2 -> 112, maxpool (or the first stride-2 stage) -> 56, then 28, 14, 7.
IMAGENET_RES = [112, 56, 28, 14, 7]
IMAGENET_TEST_RES = [32, 16, 8, 4, 2]
CIFAR_RES = [32, 16, 8]


def _cifar(name: str, build: Callable[[], nn.Module], small: bool) -> ZooEntry:
    return ZooEntry(name, build, CIFAR, CIFAR, small, CIFAR_RES, CIFAR_RES, 10)


def _imagenet(name: str, build: Callable[[], nn.Module], small: bool) -> ZooEntry:
    return ZooEntry(
        name, build, IMAGENET, IMAGENET_TEST, small, IMAGENET_RES, IMAGENET_TEST_RES, 1000
    )


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        _cifar("resnet20", resnet20, True),
        _cifar("resnet56", resnet56, True),
        _cifar("resnet110", resnet110, False),
        _cifar("resnet1202", resnet1202, False),
        _cifar("densenet_bc", densenet_bc, True),
        _imagenet("resnet18", resnet18, True),
        _imagenet("resnet50", resnet50, False),
        _imagenet("resnet101", resnet101, False),
        _imagenet("mobilenet_v1", mobilenet_v1, True),
        _imagenet("mobilenet_v2", mobilenet_v2, True),
        _imagenet("shufflenet_v1", shufflenet_v1, True),
        _imagenet("shufflenet_v2", shufflenet_v2, True),
    ]
}


def get_entry(name: str) -> ZooEntry:
    """Look up a zoo model by name, with a helpful error for typos."""
    if name not in ZOO:
        raise BadInputError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO)}")
    return ZOO[name]


def count_parameters(module: nn.Module) -> int:
    """Elements of all learnable parameters (BN running statistics are buffers, not counted)."""
    return sum(p.numel() for p in module.parameters())

"""PyTorch models shaped like ones users bring whose shape arithmetic follows the image size.

`YOLOv8Style` follows Ultralytics' YOLOv8 (Conv-BN-SiLU, C2f, SPPF, a PAN neck and the
anchor-free Detect head with DFL and anchors made from the feature-map sizes), at small
widths; exported with dynamic batch, height and width it computes its Reshape targets and
anchors from the input size, as `yolo export dynamic=True` does. `SpaceToDepthStem` has
TResNet's space-to-depth stem (a Reshape-Transpose-Reshape over `x.size()`) and one more
such rearrangement between convs, so that channels are cut through it.
"""

from __future__ import annotations

import torch
from torch import nn


class Conv(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=False):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = Conv(c1, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2, k=5):
        super().__init__()
        c_ = c1 // 2
        self.cv1, self.cv2 = Conv(c1, c_, 1), Conv(c_ * 4, c2, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    def __init__(self, c1=16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        b, _, a = x.shape
        return self.conv(x.view(b, 4, self.c1, a).transpose(2, 1).softmax(1)).view(b, 4, a)


def make_anchors(feats, strides, offset=0.5):
    anchor_points, stride_tensor = [], []
    dtype = feats[0].dtype
    for i, stride in enumerate(strides):
        _, _, h, w = feats[i].shape
        sx = torch.arange(end=w, dtype=dtype) + offset
        sy = torch.arange(end=h, dtype=dtype) + offset
        sy, sx = torch.meshgrid(sy, sx, indexing="ij")
        anchor_points.append(torch.stack((sx, sy), -1).view(-1, 2))
        stride_tensor.append(torch.full((h * w, 1), stride, dtype=dtype))
    return torch.cat(anchor_points), torch.cat(stride_tensor)


class Detect(nn.Module):
    def __init__(self, nc, ch, reg_max=16):
        super().__init__()
        self.nc, self.reg_max, self.no = nc, reg_max, nc + 4 * reg_max
        self.stride = (8.0, 16.0, 32.0)
        c2, c3 = max(16, ch[0] // 4, reg_max * 4), max(ch[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(x, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * reg_max, 1))
            for x in ch
        )
        self.cv3 = nn.ModuleList(
            nn.Sequential(Conv(x, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for x in ch
        )
        self.dfl = DFL(reg_max)

    def forward(self, x):
        x = [torch.cat((self.cv2[i](xi), self.cv3[i](xi)), 1) for i, xi in enumerate(x)]
        shape = x[0].shape
        x_cat = torch.cat([xi.view(shape[0], self.no, -1) for xi in x], 2)
        anchors, strides = (t.transpose(0, 1) for t in make_anchors(x, self.stride, 0.5))
        box, cls = x_cat.split((self.reg_max * 4, self.nc), 1)
        lt, rb = self.dfl(box).chunk(2, 1)
        anchors = anchors.unsqueeze(0)
        x1y1, x2y2 = anchors - lt, anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class YOLOv8Style(nn.Module):
    def __init__(self, nc=8, w=(8, 16, 32, 64, 128)):
        super().__init__()
        self.b0 = Conv(3, w[0], 3, 2)
        self.b1 = nn.Sequential(Conv(w[0], w[1], 3, 2), C2f(w[1], w[1], 1, True))
        self.b2 = nn.Sequential(Conv(w[1], w[2], 3, 2), C2f(w[2], w[2], 1, True))
        self.b3 = nn.Sequential(Conv(w[2], w[3], 3, 2), C2f(w[3], w[3], 1, True))
        self.b4 = nn.Sequential(Conv(w[3], w[4], 3, 2), C2f(w[4], w[4], 1, True), SPPF(w[4], w[4]))
        self.up = nn.Upsample(None, 2, "nearest")
        self.h1 = C2f(w[4] + w[3], w[3])
        self.h2 = C2f(w[3] + w[2], w[2])
        self.d1 = Conv(w[2], w[2], 3, 2)
        self.h3 = C2f(w[2] + w[3], w[3])
        self.d2 = Conv(w[3], w[3], 3, 2)
        self.h4 = C2f(w[3] + w[4], w[4])
        self.detect = Detect(nc, (w[2], w[3], w[4]))

    def forward(self, x):
        p3 = self.b2(self.b1(self.b0(x)))
        p4 = self.b3(p3)
        p5 = self.b4(p4)
        t4 = self.h1(torch.cat((self.up(p5), p4), 1))
        o3 = self.h2(torch.cat((self.up(t4), p3), 1))
        o4 = self.h3(torch.cat((self.d1(o3), t4), 1))
        o5 = self.h4(torch.cat((self.d2(o4), p5), 1))
        return self.detect([o3, o4, o5])


class SpaceToDepth(nn.Module):
    def __init__(self, block=4):
        super().__init__()
        self.bs = block

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, c, h // self.bs, self.bs, w // self.bs, self.bs)
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(n, c * self.bs * self.bs, h // self.bs, w // self.bs)


class SpaceToDepthStem(nn.Module):
    """TResNet's stem (space-to-depth by 4, then convs), a space-to-depth by 2 between convs,
    global pooling and a linear head."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(SpaceToDepth(4), Conv(48, 32, 3), Conv(32, 32, 3))
        self.body = nn.Sequential(SpaceToDepth(2), Conv(128, 64, 3), Conv(64, 64, 3))
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))

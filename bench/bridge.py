"""Bridge overhead: the OnnxModule against the torch module it was exported from.

Times forward+backward (train mode, BatchNorm kept) of CIFAR ResNet-20 at batch 64, 32x32, for the
native module and for the OnnxModule built from its export, interleaved so that load on this
shared machine hits both alike, and reports the median per-repeat ratio (target: at most 1.3x on
CPU, 1.1x on CUDA). Also times eval-mode inference and a full training step loop (SGD) in
images/second; with `--amp bf16`, the OnnxModule's training loop under bf16 autocast against
float32 (its speedup).
The same for the BN-folded export with BatchNorm re-inserted for training (what `retrain` runs on
a deployment graph) against the same native module.

    python bench/bridge.py [--repeats 10] [--batch 64] [--threads 1] [--device cpu|cuda]
                           [--amp bf16] [--json PATH]

The last line is the forward+backward ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import warnings

import torch
from torch import nn

from onnx_mbs.bridge import OnnxModule


def native_resnet20() -> nn.Module:
    """ResNet-20 from the zoo (randomised BN statistics), or a local copy if there is no zoo."""
    try:
        from onnx_mbs.models.export import build_zoo_model

        return build_zoo_model("resnet20")
    except ImportError:
        return _LocalResNet20().eval()


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.short = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.short(x))


class _LocalResNet20(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3, 16, 3, 1, 1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
        ]
        c = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(_Block(c, width, stride if i == 0 else 1))
                c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def export_folded_reinserted(net: nn.Module, batch: int) -> OnnxModule:
    """The BN-folded export with BatchNorm re-inserted after each Conv, as `retrain` builds it."""
    from onnx_mbs.bridge.bn import reinsert_bn
    from onnx_mbs.models.export import export_onnx

    folded = export_onnx(net, (batch, 3, 32, 32), form="deploy")
    train_model, inserted = reinsert_bn(folded, [torch.randn(batch, 3, 32, 32)])
    assert len(inserted) == sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    return OnnxModule(train_model)


def export_train_form(net: nn.Module, batch: int) -> OnnxModule:
    import io

    import onnx

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net.eval(),
            (torch.zeros(batch, 3, 32, 32),),
            f,
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["x"],
            output_names=["y"],
        )
    return OnnxModule(onnx.load_from_string(f.getvalue()))


def _sync(x: torch.Tensor) -> None:
    """CUDA runs asynchronously: wait for it before reading the clock."""
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> float:
    _sync(x)
    t0 = time.perf_counter()
    module(x).sum().backward()
    _sync(x)
    elapsed = time.perf_counter() - t0
    module.zero_grad(set_to_none=True)
    return elapsed


@torch.no_grad()
def forward_eval(module: nn.Module, x: torch.Tensor) -> float:
    _sync(x)
    t0 = time.perf_counter()
    module(x)
    _sync(x)
    return time.perf_counter() - t0


def train_loop(
    module: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, bf16: bool = False
) -> float:
    """Images/second of `steps` SGD steps (forward, cross-entropy, backward, update)."""
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    autocast = (
        torch.autocast(x.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    _sync(x)
    t0 = time.perf_counter()
    for _ in range(steps):
        with autocast:
            out = module(x)
        loss = nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(x)
    return steps * len(x) / (time.perf_counter() - t0)


def interleaved(fn, a: nn.Module, b: nn.Module, x: torch.Tensor, repeats: int) -> list[tuple]:
    fn(a, x), fn(b, x)  # warm-up
    return [(fn(a, x), fn(b, x)) for _ in range(repeats)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="steps per training-loop measurement")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", choices=["off", "bf16"], default="off")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)

    native = native_resnet20()
    bridged = export_train_form(native, args.batch)
    reinserted = export_folded_reinserted(native, args.batch)
    native.to(device), bridged.to(device), reinserted.to(device)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"ResNet-20, batch {args.batch}, 32x32, on {where}, {args.threads} thread(s), "
        f"{args.repeats} interleaved repeats; OnnxModule runs {len(bridged.runtime_ops)} nodes"
    )

    native.train(), bridged.train(), reinserted.train()
    train_pairs = interleaved(fwd_bwd, native, bridged, x, args.repeats)
    reinserted_pairs = interleaved(fwd_bwd, native, reinserted, x, args.repeats)
    native.eval(), bridged.eval()
    eval_pairs = interleaved(forward_eval, native, bridged, x, args.repeats)
    native.train(), bridged.train()
    loop = [
        (train_loop(native, x, y, args.steps), train_loop(bridged, x, y, args.steps))
        for _ in range(max(1, args.repeats // 3))
    ]

    def row(label: str, pairs: list[tuple], unit: str, scale: float) -> float:
        a = statistics.median(p[0] for p in pairs) * scale
        b = statistics.median(p[1] for p in pairs) * scale
        ratio = statistics.median(p[1] / p[0] for p in pairs)
        print(f"{label:<28}{a:>12.1f}{b:>14.1f}  {unit:<10}{ratio:>8.3f}")
        return ratio

    print(f"{'measure':<28}{'torch':>12}{'OnnxModule':>14}  {'unit':<10}{'ratio':>8}")
    ratio = row("forward+backward (train)", train_pairs, "ms", 1000)
    folded_ratio = row("  BN-folded, BN re-inserted", reinserted_pairs, "ms", 1000)
    row("forward (eval, no_grad)", eval_pairs, "ms", 1000)
    loop_ratio = statistics.median(b / a for a, b in loop)
    a, b = statistics.median(p[0] for p in loop), statistics.median(p[1] for p in loop)
    print(f"{'training step loop':<28}{a:>12.1f}{b:>14.1f}  {'images/s':<10}{loop_ratio:>8.3f}")
    figures = {
        "device": where,
        "batch": args.batch,
        "fwd_bwd_ratio": ratio,
        "fwd_bwd_ratio_bn_reinserted": folded_ratio,
        "train_images_per_s": {"torch": a, "onnx_module": b},
        "train_loop_ratio": loop_ratio,
    }
    if args.amp == "bf16":
        amp = [
            (
                train_loop(bridged, x, y, args.steps),
                train_loop(bridged, x, y, args.steps, bf16=True),
            )
            for _ in range(max(1, args.repeats // 3))
        ]
        speedup = statistics.median(b / a for a, b in amp)
        a, b = statistics.median(p[0] for p in amp), statistics.median(p[1] for p in amp)
        print(
            f"{'OnnxModule fp32 vs bf16':<28}{a:>12.1f}{b:>14.1f}  {'images/s':<10}{speedup:>8.3f}"
        )
        figures["bf16_autocast_speedup"] = speedup
    target = 1.1 if device.type == "cuda" else 1.3
    for label, value in (("BN re-inserted", folded_ratio), ("BN kept", ratio)):
        verdict = "ok" if value <= target else "ABOVE TARGET"
        print(
            f"forward+backward time ratio OnnxModule/torch, {label}: {value:.3f} "
            f"(target <= {target}: {verdict})"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

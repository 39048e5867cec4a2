"""Train a zoo model on Fashion-MNIST and save it as a train-form ONNX model.

    python -m onnx_mbs.models.train resnet20 --epochs 3 -o resnet20_fmnist.onnx

Images stay 1x28x28 (no resize); preprocessing is (pixel / 255 - mean) / std
with the training set's mean/std, recorded in the ONNX metadata_props
(onnx_mbs.mean, onnx_mbs.std, onnx_mbs.dataset, onnx_mbs.test_top1) so that
later tools can feed the model the way it was trained.
`train_model` is also used by benchmarks to train baselines.
"""

from __future__ import annotations

import argparse
import gzip
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from onnx_mbs.models.export import export_onnx
from onnx_mbs.models.zoo import get_entry
from onnx_mbs.passes.errors import BadInputError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DATASET_NAME = "fashion-mnist"
Arrays = tuple[np.ndarray, np.ndarray]


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes into an array of its shape."""
    path = Path(path)
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise BadInputError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", folder: str | Path = FMNIST_DIR) -> Arrays:
    """Return (x uint8 N,1,28,28, y int64 N) for split 'train' or 't10k'/'test'."""
    prefix = "t10k" if split in ("test", "t10k") else "train"
    arrays = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        candidates = [Path(folder) / f"{prefix}-{kind}{ext}" for ext in ("", ".gz")]
        found = [p for p in candidates if p.exists()]
        if not found:
            raise BadInputError(
                f"no {prefix}-{kind}[.gz] in {folder}; install dataset-fashion-mnist or pass --data"
            )
        arrays.append(read_idx(found[0]))
    images, labels = arrays
    return images[:, None, :, :].copy(), labels.astype(np.int64)


def channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    scaled = x.astype(np.float64) / 255.0
    axes = (0, 2, 3)
    return scaled.mean(axis=axes).tolist(), scaled.std(axis=axes).tolist()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or raw-pixel float) images -> model input."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def augment(x: torch.Tensor, rng: np.random.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding (black, like the background) and random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.from_numpy(rng.random(n) < 0.5)
    out[flip] = out[flip].flip(3)
    return out


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Arrays,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
) -> float:
    """Top-1 accuracy of `model` (put in eval mode) on raw uint8 images."""
    x, y = data
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(normalize(torch.from_numpy(x[i : i + batch_size]), mean, std))
        correct += int((logits.argmax(1).numpy() == y[i : i + batch_size]).sum())
    return correct / len(x)


def train_model(
    model: nn.Module,
    train: Arrays,
    test: Arrays | None = None,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    epochs: int = 3,
    lr: float = 0.1,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    use_augment: bool = True,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> float:
    """Train `model` in place with SGD + cosine schedule; return test top-1 (nan without test).

    Data are raw uint8 arrays (x N,C,H,W; y N); normalisation with mean/std
    happens per batch so the same arrays serve every model.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    x, y = train
    steps_per_epoch = math.ceil(len(x) / batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for epoch in range(epochs):
        model.train()
        start, total_loss, correct = time.perf_counter(), 0.0, 0
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            batch = torch.from_numpy(x[idx])
            if use_augment:
                batch = augment(batch, rng)
            labels = torch.from_numpy(y[idx])
            logits = model(normalize(batch, mean, std))
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(idx)
            correct += int((logits.argmax(1) == labels).sum())
        message = (
            f"epoch {epoch + 1}/{epochs}: loss {total_loss / len(x):.4f}, "
            f"train top-1 {correct / len(x):.4f}, {time.perf_counter() - start:.0f}s"
        )
        if test is not None:
            message += f", test top-1 {evaluate(model, test, mean, std):.4f}"
        log(message)
    return evaluate(model, test, mean, std) if test is not None else float("nan")


def with_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> onnx.ModelProto:
    """Return a copy of `proto` with `props` set in metadata_props (replacing equal keys)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    kept = [p for p in out.metadata_props if p.key not in props]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    for key, value in props.items():
        out.metadata_props.add(key=key, value=value)
    return out


def save_samples(folder: str | Path, data_dir: str | Path = FMNIST_DIR) -> None:
    """Write the bundled raw-pixel samples: first 512 test and first 2048 train images."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    samples = (("test", 512, "fmnist_sample.npz"), ("train", 2048, "fmnist_train_sample.npz"))
    for split, count, name in samples:
        x, y = load_fashion_mnist(split, data_dir)
        file = folder / name
        np.savez_compressed(file, x=x[:count], y=y[:count])
        print(f"wrote {file}: {count} {split} images")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onnx_mbs.models.train",
        description="Train a zoo model on Fashion-MNIST; write it as train-form ONNX.",
    )
    parser.add_argument("name", nargs="?", help="zoo model, e.g. resnet20")
    parser.add_argument("-o", "--output", help="output .onnx path")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=0, help="use the first N training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--data", default=str(FMNIST_DIR), help="Fashion-MNIST IDX folder")
    parser.add_argument(
        "--write-samples", metavar="DIR", help="write the bundled .npz samples into DIR"
    )
    args = parser.parse_args(argv)
    try:
        if args.write_samples:
            save_samples(args.write_samples, args.data)
        if not args.name:
            if args.write_samples:
                return 0
            raise BadInputError("give a zoo model NAME (and -o OUTPUT)")
        if not args.output:
            raise BadInputError("give -o OUTPUT.onnx")
        if args.epochs < 1:
            raise BadInputError(f"--epochs must be at least 1, got {args.epochs}")
        entry = get_entry(args.name)
        train = load_fashion_mnist("train", args.data)
        test = load_fashion_mnist("test", args.data)
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.limit > 0:
        train = (train[0][: args.limit], train[1][: args.limit])
    torch.set_num_threads(args.threads)
    mean, std = channel_stats(train[0])
    print(f"{args.name} on {len(train[0])} Fashion-MNIST images; mean {mean}, std {std}")
    torch.manual_seed(args.seed)
    model = entry.build(num_classes=10, in_channels=1)
    top1 = train_model(
        model, train, test, mean=mean, std=std, epochs=args.epochs, lr=args.lr, seed=args.seed
    )
    print(f"test top-1: {top1:.4f}")
    proto = export_onnx(model, (1, 1, 28, 28), form="train", dynamic_batch=True)
    proto = with_metadata(
        proto,
        {
            "onnx_mbs.mean": ",".join(f"{v:.6f}" for v in mean),
            "onnx_mbs.std": ",".join(f"{v:.6f}" for v in std),
            "onnx_mbs.dataset": DATASET_NAME,
            "onnx_mbs.test_top1": f"{top1:.4f}",
            "onnx_mbs.model": args.name,
            "onnx_mbs.train": (
                f"epochs={args.epochs} limit={len(train[0])} seed={args.seed} lr={args.lr} "
                "sgd momentum=0.9 wd=5e-4 batch=128 cosine, crop pad 2 + hflip"
            ),
        },
    )
    onnx.save(proto, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

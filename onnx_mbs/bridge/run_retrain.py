"""Retrain an ONNX model on an .npz, as one process or under torchrun (DistributedDataParallel).

    python -m onnx_mbs.bridge.run_retrain MODEL -o OUT --data TRAIN.npz [--val VAL.npz]
    torchrun --nproc_per_node=2 -m onnx_mbs.bridge.run_retrain MODEL -o OUT --data TRAIN.npz

The .npz holds `x` (N, C, H, W; uint8 is scaled by 1/255, other types are used as they are) and
`y` (N labels). Only rank 0 writes OUT, through a temporary file renamed into place.
Exit codes: 0 done, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnx_mbs.bridge.train import retrain
from onnx_mbs.passes.errors import BadInputError


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(x float32 NCHW, y int64 or None) from an .npz with arrays x and y."""
    try:
        with np.load(path) as data:
            if "x" not in data:
                raise BadInputError(f"{path} has no array 'x' (it has {sorted(data.files)})")
            x = data["x"]
            y = data["y"].astype(np.int64) if "y" in data else None
    except (OSError, ValueError) as e:
        if isinstance(e, BadInputError):
            raise
        raise BadInputError(f"cannot read {path} as .npz: {e}") from e
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W): one channel
    if x.ndim != 4:
        raise BadInputError(f"{path}: x must be (N, C, H, W), got shape {x.shape}")
    return x, y


def save_atomic(model: onnx.ModelProto, out: str) -> None:
    """Write to a temporary file next to `out`, then rename: no partial file on failure."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m onnx_mbs.bridge.run_retrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="ONNX model to retrain")
    p.add_argument("-o", "--output", required=True, help="where to write the retrained model")
    p.add_argument("--data", required=True, help="training .npz (x, y)")
    p.add_argument("--val", help="validation .npz (x, y); picks the best epoch")
    p.add_argument("--teacher", help="ONNX teacher to distil from (e.g. the original model)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _load_model(path: str) -> onnx.ModelProto:
    try:
        return onnx.load(path)
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's file
        raise BadInputError(f"cannot read ONNX model {path}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        model = _load_model(args.model)
        teacher = _load_model(args.teacher) if args.teacher else None
        train = load_npz(args.data)
        val = load_npz(args.val) if args.val else None
        result = retrain(
            model,
            train,
            val,
            teacher=teacher,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            seed=args.seed,
            device=args.device,
            progress=not args.no_progress,
        )
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        save_atomic(result.model, args.output)
        for e in result.history:
            print(
                f"epoch {e.epoch + 1}: loss {e.train_loss:.4f} train acc {e.train_acc:.4f} "
                f"val top1 {e.val_top1:.4f}"
            )
        print(
            f"best epoch {result.best_epoch + 1}, {result.images_per_second:.0f} images/s "
            f"on {result.device} x{result.world_size} -> {args.output}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""IDX files (the MNIST / Fashion-MNIST format), plain or gzipped."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from onnx_mbs.passes.errors import BadInputError

_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
SPLITS = {"test": "t10k", "train": "train"}


def read_idx(path: Path) -> np.ndarray:
    """The array stored in one IDX file (native byte order)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise BadInputError(f"cannot read IDX file {path}: {error}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _TYPES:
        raise BadInputError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(data[4:header], ">u4"))
    dtype = np.dtype(_TYPES[data[2]])
    if len(data) - header != int(np.prod(dims)) * dtype.itemsize:
        raise BadInputError(f"IDX file {path} is truncated or has trailing data")
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def is_idx_folder(folder: Path) -> bool:
    return any("idx3" in p.name for p in folder.iterdir() if p.is_file())


def find_split(folder: Path, split: str) -> tuple[Path, Path | None]:
    """Image file and (optional) label file of one split, e.g. t10k-images-idx3-ubyte.gz."""
    prefix = SPLITS[split]
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(prefix))
    images = [p for p in files if "idx3" in p.name]
    labels = [p for p in files if "idx1" in p.name]
    if not images:
        raise BadInputError(
            f"IDX folder {folder} has no {prefix}-images-idx3-ubyte[.gz] for the {split} split; "
            f"pick a split with {folder}:train or {folder}:test"
        )
    return images[0], (labels[0] if labels else None)

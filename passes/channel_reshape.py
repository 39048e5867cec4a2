"""Reshape algebra for the channel walk: where channel ids land when a Reshape or
Flatten regroups dimensions (a channel shuffle is a Reshape-Transpose-Reshape that
permutes them)."""

from __future__ import annotations

import numpy as np

from .channel_walk import ChannelWalk


def reshape_ids(
    w: ChannelWalk,
    in_shape: tuple[int, ...],
    axis: int,
    ids: np.ndarray,
    out_shape: tuple[int, ...],
) -> tuple[int, np.ndarray] | None:
    """Follow channel ids through a reshape. Only the block of dims merged or split
    together with the channel axis is materialized. If channels end up varying along
    several output axes (a channel shuffle's (g, C/g) split), all but the last are
    tied so that every kept set stays a box: the leading axes keep their size."""
    in_dims, out_dims = reshape_blocks(in_shape, out_shape)
    block = next((b for b, dims in enumerate(in_dims) if axis in dims), None)
    if block is None or not out_dims[block]:
        return None
    src, dst = in_dims[block], out_dims[block]
    sub = [in_shape[d] if d == axis else 1 for d in src]
    full = np.broadcast_to(ids.reshape(sub), [in_shape[d] for d in src])
    out = full.reshape([out_shape[d] for d in dst])
    varying = [k for k in range(out.ndim) if out.shape[k] > 1 and axis_varies(w, out, k)]
    # Channels all of one class (units that tie every channel: a GroupNorm after a grouped
    # conv) vary nowhere: they go on the block's first axis, where channels lead their
    # block ((N, C, H, W) <-> (N, G, -1)), not its last (W), which a Conv reads as
    # channels on the wrong axis.
    last = varying[-1] if varying else 0
    moved = np.moveaxis(out, last, -1).reshape(-1, out.shape[last])
    for row in moved[1:]:
        w.union(moved[0], row)
    return dst[last], moved[0].copy()


def axis_varies(w: ChannelWalk, arr: np.ndarray, k: int) -> bool:
    """Whether the class changes along axis k anywhere in `arr`."""
    moved = np.moveaxis(arr, k, 0).reshape(arr.shape[k], -1)
    return any(w.varies(moved[:, j]) for j in range(moved.shape[1]))


def reshape_blocks(
    a: tuple[int, ...], b: tuple[int, ...]
) -> tuple[list[list[int]], list[list[int]]]:
    """Pair up runs of dims of `a` and `b` with equal products (size-1 dims on their own)."""
    ia = ib = 0
    blocks_a: list[list[int]] = []
    blocks_b: list[list[int]] = []
    while ia < len(a) or ib < len(b):
        if ia < len(a) and a[ia] == 1:
            blocks_a.append([ia])
            blocks_b.append([])
            ia += 1
            continue
        if ib < len(b) and b[ib] == 1:
            blocks_a.append([])
            blocks_b.append([ib])
            ib += 1
            continue
        if ia >= len(a) or ib >= len(b):
            raise ValueError(f"cannot pair reshape {a} -> {b}")
        da, db = [ia], [ib]
        pa, pb = a[ia], b[ib]
        ia += 1
        ib += 1
        while pa != pb:
            if pa < pb:
                pa *= a[ia]
                da.append(ia)
                ia += 1
            else:
                pb *= b[ib]
                db.append(ib)
                ib += 1
        blocks_a.append(da)
        blocks_b.append(db)
    return blocks_a, blocks_b

"""One-shot Python readers made readable again, for the doors that read their data per call.

A CalibrationDataReader (get_next() until None) or a generator of input dicts is gone once
read. `reduce` reads it once; a pass (`MacroblockScaling`) or a Polygraphy loader
(`ReduceOnnx`) reads its data on every call: Polygraphy calls a loader once per use, a pass
runs on several models. Read directly, the second call found the reader empty, or, after a
first call's `limit`, measured the samples that followed (another model, without a word).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

_END = object()


class Replay:
    """A one-shot reader read again: each iteration gives the items the reader gave so far,
    then reads on. Only what some call read is kept (a `limit` stops the reading)."""

    def __init__(self, reader: Any) -> None:
        self._reader = iter(reader.get_next, None) if hasattr(reader, "get_next") else iter(reader)
        self._read: list[Any] = []
        self.samples = getattr(reader, "samples", None)  # where a padding reader's copies start

    def __iter__(self) -> Iterator[Any]:
        k = 0
        while True:
            if k == len(self._read):
                item = next(self._reader, _END)
                if item is _END:
                    return
                self._read.append(_kept(item))
            yield self._read[k]
            k += 1


def _kept(item: Any) -> Any:
    """`item` as it is now: a reader may refill one buffer (or dict) for every batch."""
    if isinstance(item, Mapping):
        return {key: np.array(value) for key, value in item.items()}
    return item


def replayable(data: Any) -> Any:
    """`data` as a door that reads it on every call keeps it: a one-shot reader (anything
    but a path, a dict or a sequence of dicts) wrapped in a `Replay`; the rest as it is."""
    if data is None or isinstance(data, (str, os.PathLike, Mapping, Sequence, Replay)):
        return data
    if not hasattr(data, "get_next") and not hasattr(data, "__iter__"):
        return data  # not a reader: open_data refuses it, naming it
    return Replay(data)

"""Training batches: shuffled per epoch, decoded and augmented in worker processes, prefetched.

The order is a permutation seeded with (seed, epoch), and a batch is a pure function of
(epoch, its sample indices): workers only change who computes it, never what, so `workers` does
not change the samples, their order or their augmentation (torch's DataLoader keeps the order).
Image folders stay on disk (a batch's files are decoded when the batch is built); arrays and
npz/IDX pixels stay in memory and are preprocessed a batch at a time.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from onnx_mbs.data import to_arrays
from onnx_mbs.data.augment import Augment
from onnx_mbs.data.preprocess import Preprocess
from onnx_mbs.data.spec import AS_FED, class_labels
from onnx_mbs.lifeline import end_with_parent
from onnx_mbs.passes.errors import BadInputError

PREFETCH_BATCHES = 4  # per worker


@dataclass
class Samples:
    """Indexable samples: `take(indices)` gives (x float32 model inputs, or in `fed`, y int64
    or None)."""

    source: Any  # an object with take(indices) -> Batch, or None for arrays
    x: np.ndarray | None
    y: np.ndarray | None
    count: int
    labelled: bool
    preprocess: Preprocess | None
    decoded: bool  # samples are decoded from files when taken (worth worker processes)
    fed: np.dtype | None = None  # a non-float model input's own type, x fed as it is

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.source is None:
            return self.x[indices], (None if self.y is None else self.y[indices])
        batch = self.source.take(indices)
        x = np.ascontiguousarray(batch.x, dtype=np.float32 if self.fed is None else self.fed)
        y = batch.y.astype(np.int64) if self.labelled and batch.y is not None else None
        return x, y

    def labels(self) -> np.ndarray | None:
        """Every sample's label, without reading the samples (None: unlabelled)."""
        if not self.labelled:
            return None
        return self.y if self.source is None else self.source.labels


def as_samples(data: Any, what: str, fed: np.dtype | None = None) -> Samples:
    """Samples from an (x, y) pair of arrays or a DataSource (read on demand where it can be).
    `fed`: the model input's own type where it is not float (uint8 pixels its graph converts
    itself); the data must give exactly that type, fed as it is, as onnxruntime is fed."""
    if hasattr(data, "take") and hasattr(data, "batches"):
        labels = getattr(data, "labels", None)
        if fed is not None and len(data):
            _check_fed(data.take(np.arange(1)).x.dtype, fed, what)
        return Samples(
            data,
            None,
            None,
            len(data),
            labels is not None,
            getattr(data, "preprocess", None),
            hasattr(data, "files"),
            fed,
        )
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif hasattr(data, "batches"):
        x, y = to_arrays(data)
    else:
        raise BadInputError(f"{what} must be an (x, y) pair of arrays or a DataSource")
    x = np.asarray(x)
    if fed is not None:
        _check_fed(x.dtype, fed, what)
    elif x.dtype.kind != "f":  # cast, uint8 pixels would train as 0..255
        raise BadInputError(
            f"{what}: x has dtype {x.dtype}; (x, y) arrays are model inputs, {AS_FED}, or give "
            "a DataSource (onnx_mbs.data.fit.open_for_model(spec, model))"
        )
    x = np.ascontiguousarray(x, dtype=np.float32 if fed is None else fed)
    if len(x) == 0:
        raise BadInputError(f"{what} has no samples")
    if y is not None:
        y = class_labels(y, len(x), what)
    return Samples(None, x, y, len(x), y is not None, None, False, fed)


def _check_fed(given: np.dtype, fed: np.dtype, what: str) -> None:
    """A non-float model input takes its own type, as it is: floats for a uint8 input (images
    preprocessed to [0, 1]) are not what onnxruntime is fed, nor is a cast of them."""
    if given != fed:
        raise BadInputError(
            f"{what} gives {given} model inputs, but the model input takes {fed}, fed as it "
            f"is (as onnxruntime is fed): give model-ready {fed} data ({fed} (x, y) arrays, or "
            f"an .npz with a {fed} array named after the input)"
        )


def without_labels(samples: Samples) -> Samples:
    return Samples(
        samples.source,
        samples.x,
        None,
        samples.count,
        False,
        samples.preprocess,
        samples.decoded,
        samples.fed,
    )


class _Batches(torch.utils.data.Dataset):
    """Builds one batch from its key (epoch, indices); errors come back as values so that the
    main process can refuse in one line rather than with a worker's traceback."""

    def __init__(self, samples: Samples, augment: Augment | None, seed: int) -> None:
        self.samples = samples
        self.augment = augment
        self.seed = seed

    def __getitem__(self, key: tuple[int, np.ndarray]) -> Any:
        epoch, indices = key
        try:
            x, y = self.samples.take(indices)
            if self.augment is not None:
                x = self.augment(x, indices, self.seed, epoch)
        except BadInputError as error:
            return str(error)
        return torch.from_numpy(x), (None if y is None else torch.from_numpy(y))

    def __len__(self) -> int:
        return 0


def _identity(batch: Any) -> Any:
    return batch


def load_batches(
    samples: Samples,
    keys: Sequence[tuple[int, np.ndarray]],
    augment: Augment | None,
    seed: int,
    workers: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The batches `keys` name, in their order, built by `workers` processes (0: this one)."""
    dataset = _Batches(samples, augment, seed)
    if workers == 0:
        built: Any = (dataset[key] for key in keys)
    else:
        with _signals_deferred() as handlers:  # the workers are forked in iter()
            built = iter(
                torch.utils.data.DataLoader(
                    dataset,
                    batch_size=None,
                    sampler=list(keys),
                    num_workers=workers,
                    collate_fn=_identity,
                    prefetch_factor=PREFETCH_BATCHES,
                    worker_init_fn=functools.partial(_start_worker, handlers, os.getpid()),
                    # Its base seed from a generator of its own: drawn from torch's global
                    # one, it would move dropout's masks with the worker count.
                    generator=torch.Generator(),
                )
            )
    for batch in built:
        if isinstance(batch, str):
            raise BadInputError(batch)
        yield batch


# SIGHUP where the system has one (not Windows)
_DEFERRED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextlib.contextmanager
def _signals_deferred() -> Iterator[dict[int, Any]]:
    """Hold Ctrl-C, SIGTERM and SIGHUP while worker processes are forked, and deliver them after.
    Arriving then, they were raised inside a fork hook (logging's), where Python prints and
    drops an exception: the run went on to the end. Yields the handlers they had, which the
    workers get back (`_set_handlers`). Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    caught: list[int] = []

    def record(signum: int, frame: object) -> None:
        caught.append(signum)

    handlers = {s: signal.signal(s, record) for s in _DEFERRED}
    try:
        yield handlers
    finally:
        _set_handlers(handlers)
        if caught:
            signal.raise_signal(caught[0])  # now, to the handler the run had


def _set_handlers(handlers: dict[int, Callable | int | None]) -> None:
    """Install `handlers` (signal number -> handler)."""
    for number, handler in handlers.items():
        if handler is not None:
            signal.signal(number, handler)


def _start_worker(handlers: dict[int, Callable | int | None], parent: int, worker_id: int) -> None:
    """A worker's init function: the run's signal handlers, and an end with `parent` (the
    process that forked it). Killed between the fork and here, that process left a worker that
    waited for batches for ever: torch's watchdog took the reaper for its parent."""
    end_with_parent(parent, signal.SIGKILL)
    _set_handlers(handlers)


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of sample indices: a function of (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def rank_batches(
    count: int, seed: int, epoch: int, rank: int, world: int, local_batch: int, steps: int
) -> list[tuple[int, np.ndarray]]:
    """This rank's batch keys of one epoch: the permutation split into `world` shards."""
    per_rank = count // world
    mine = epoch_order(count, seed, epoch)[: per_rank * world][rank::world]
    return [
        (epoch, np.sort(mine[step * local_batch : (step + 1) * local_batch]))
        for step in range(steps)
    ]

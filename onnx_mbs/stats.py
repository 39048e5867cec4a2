"""Per-channel activation statistics: the instrumented model (instrument.py) run by
onnxruntime over the calibration data, its reductions summed on the host.

The session is built to be cheap in memory and time (issue 13): its large weights are
page-aligned external data that onnxruntime maps (and the pipeline lends it the analysis
form's weights meanwhile, `weights_aside` in weights_file.py), its nodes run in
priority-based order (each reduction right after its tensor), its optimisation level is the
highest that repays its build over the calibration set (level_costs.py), and single-sample
runs on the CPU go two or more at a time on one thread each.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnx_mbs.data import Batch, DataSource, batch_inputs
from onnx_mbs.instrument import DEEP, StatOutputs, instrument_without_weights
from onnx_mbs.level_costs import LARGE_WEIGHTS_MB, optimization_level
from onnx_mbs.passes.errors import BadInputError, temporary_folder_error
from onnx_mbs.passes.external_data import WEIGHTS_FILE
from onnx_mbs.passes.scratch import scratch_folder
from onnx_mbs.progress import progress_bar
from onnx_mbs.runtime import (
    batch_feeds,
    concurrent_runs,
    feed_dtype,
    in_order,
    make_session,
    release_freed_memory,
    session_provider,
)
from onnx_mbs.weights_file import write_with_weights

if TYPE_CHECKING:
    import onnxruntime as ort


@dataclass
class TensorStats:
    positive: np.ndarray  # per channel count of x > 0
    abs_sum: np.ndarray | None  # per channel sum of |x| (None when not measured)
    elements_per_channel: int  # N*H*W summed over batches

    @property
    def channels(self) -> int:
        return len(self.positive)

    @property
    def ratio(self) -> float:
        """rho: the fraction of all elements that are > 0."""
        return float(self.positive.sum() / (self.elements_per_channel * self.channels))

    def part(self, start: int, count: int | None = None) -> TensorStats:
        """The statistics of channels start..start+count only (a conv's own channels of an
        activation that a Concat joined it into; without `count`, from start on)."""
        end = None if count is None else start + count
        abs_sum = None if self.abs_sum is None else self.abs_sum[start:end]
        return TensorStats(self.positive[start:end], abs_sum, self.elements_per_channel)

    @property
    def channel_ratio(self) -> np.ndarray:
        return self.positive / self.elements_per_channel

    @property
    def channel_mean_abs(self) -> np.ndarray:
        if self.abs_sum is None:
            raise ValueError("magnitudes were not measured: collect_stats(..., magnitudes=True)")
        return self.abs_sum / self.elements_per_channel


@dataclass
class ActivationStats:
    tensors: dict[str, TensorStats]
    samples: int
    provider: str
    seconds: float


def collect_stats(
    model: onnx.ModelProto,
    tensors: Sequence[str],
    data: DataSource,
    providers: list[str],
    batch_size: int = 64,
    progress: bool = True,
    magnitudes: bool = True,
    spatial_mean: str = "pool",
    written: Callable[[onnx.ModelProto], onnx.ModelProto] | None = None,
    macs_per_sample: int | None = None,
    weights_folder: Path | None = None,
) -> ActivationStats:
    """Per-channel count of x > 0 and sum |x| for each tensor, over all of `data`.

    Memory stays flat in the number of samples: batches are streamed and only the
    per-channel reductions leave onnxruntime. `model` is not modified. `written` (a
    LoadedModel's `write_form`) makes the instrumented model take the inputs a written
    model takes when `model` is the analysis form, whose inferred shapes then spare
    inferring them again. `macs_per_sample`, when
    known, lets a deep graph run on few samples skip onnxruntime's slow-to-build layout
    optimisation levels (see `optimization_level`). `weights_folder` holds the large
    weights `model` references (`weights_aside`); the instrumented model is written there.
    """
    start = time.perf_counter()
    batches = data.batches(batch_size)
    first = next(batches, None)
    if first is None:
        raise BadInputError(f"no samples in {data.description}")
    fed = {name: array.shape for name, array in batch_inputs(first, data.input_name).items()}
    _check_inputs(model, list(fed))
    instrumented, outputs = instrument_without_weights(
        model, tensors, fed, magnitudes, spatial_mean
    )
    if written is not None:
        written(instrumented)
    workers = concurrent_runs(providers, len(first.x), len(data))
    # onnxruntime reads the model from a file written a tensor at a time: no copy of the
    # weights, serialized or not, beside `model`'s; the large ones it maps (issue 13).
    try:
        with contextlib.ExitStack() as stack:
            folder = weights_folder or stack.enter_context(scratch_folder())
            path = folder / "instrumented.onnx"
            computed = {name for node in instrumented.graph.node for name in node.output}
            weights = [t for t in model.graph.initializer if t.name not in computed]
            write_with_weights(instrumented, weights, path)
            level = "full"
            weight_bytes = (folder / WEIGHTS_FILE).stat().st_size
            if macs_per_sample is not None:
                weight_mb = weight_bytes / 2**20
                nodes = len(instrumented.graph.node)
                level = optimization_level(nodes, weight_mb, len(data), macs_per_sample)
            del instrumented
            session = make_session(
                path,
                providers,
                threads=1 if workers > 1 else 0,
                level=level,
                side_branches_early=piles_up(outputs, len(first.x) * workers, weight_bytes),
            )
    except OSError as e:
        raise temporary_folder_error(e) from None
    feed_type = feed_dtype(session, data.input_name, ready=data.preprocess is None)
    names = [o.name for o in session.get_outputs()]

    run = functools.partial(_run, session, data.input_name, feed_type)

    packed = _PackedSums(outputs)
    loose = {o: _Accumulator() for o in outputs if o.packed_at is None}
    samples = 0
    bar = progress_bar(len(data), "activation statistics", progress)
    with bar:
        for (_, batch), results in in_order(run, enumerate(chain([first], batches)), workers):
            values = dict(zip(names, results, strict=True))
            rows = len(batch.x)
            _check_finite(values, outputs, rows, samples, data.description)
            if packed.outputs:
                packed.add(values[packed.outputs[0].packed], rows)
            for out, accumulator in loose.items():
                accumulator.add(out, values, rows)
            samples += rows
            bar.update(rows)
    provider = session_provider(session)
    del session, run  # closes the session: its memory can go back
    release_freed_memory()
    found = packed.result(samples) | {o.tensor: acc.result() for o, acc in loose.items()}
    tensors_stats = {o.tensor: found[o.tensor] for o in outputs}
    return ActivationStats(tensors_stats, samples, provider, time.perf_counter() - start)


# Bytes of watched tensors in flight from which holding them all weighs on memory; on
# models whose weights pass LARGE_WEIGHTS_MB, half their bytes (memory is budgeted as a
# multiple of the model file: issue 13).
HELD_LIMIT = 256 * 2**20


def piles_up(outputs: Sequence[StatOutputs], rows: int, weight_bytes: int = 0) -> bool:
    """Whether the watched tensors would pile up in onnxruntime's default order, which runs
    the whole main path first and holds each until then, over `rows` samples in flight: in
    a deep graph (ResNet-1202, 2 single-sample runs: 310 MB against 139 MB in the
    priority-based order, which runs each reduction as soon as its tensor exists), past
    HELD_LIMIT (ResNet-50 at batch 64 would hold 2.3 GB), or past half the weights of a
    large model (ResNet-50, 2 single-sample runs: 72 MB, 3.1x the file against 2.2x).
    Elsewhere the priority-based order only costs time (ResNet-56 at batch 64, 136 MB:
    see instrument.DEEP)."""
    if len(outputs) > DEEP:
        return True
    if any(o.channels is None or o.spatial is None for o in outputs):
        return True  # sizes unknown: take the safe order
    held = 4 * rows * sum(o.channels * o.spatial for o in outputs)
    large = weight_bytes > LARGE_WEIGHTS_MB * 2**20
    return held > HELD_LIMIT or (large and held > weight_bytes / 2)


class _PackedSums:
    """Running float64 sums of PACKED's columns, which hold whole per-sample sums already:
    one numpy call a batch, however many tensors are watched (per-tensor host arithmetic
    cost as much as the statistics' kernels on CUDA)."""

    def __init__(self, outputs: list[StatOutputs]) -> None:
        self.outputs = [o for o in outputs if o.packed_at is not None]
        self.total: np.ndarray | None = None

    def add(self, packed: np.ndarray, rows: int) -> None:
        """Add the first `rows` samples (the rest pads a short batch to a fixed one)."""
        sums = packed[:rows].reshape(rows, -1).sum(axis=0, dtype=np.float64)
        self.total = sums if self.total is None else self.total + sums

    def result(self, samples: int) -> dict[str, TensorStats]:
        """Each packed tensor's statistics over the `samples` added."""
        stats = {}
        for out in self.outputs:
            assert self.total is not None and out.spatial is not None
            counts, sums = out.columns()
            abs_sum = None if sums is None else self.total[sums]
            elements = samples * out.spatial
            stats[out.tensor] = TensorStats(self.total[counts], abs_sum, elements)
        return stats


class _Accumulator:
    """Running float64 sums for one tensor with outputs of its own (not packed)."""

    def __init__(self) -> None:
        self.positive: np.ndarray | None = None
        self.abs_sum: np.ndarray | None = None
        self.elements = 0

    def add(self, out: StatOutputs, values: dict[str, np.ndarray], rows: int) -> None:
        """Add the first `rows` samples of a tensor's own outputs (not packed)."""
        fraction = values[out.positive][:rows].astype(np.float64)
        batch, channels = fraction.shape[:2]
        spatial = out.spatial or int(np.prod(values[out.shape][2:]))
        # GAP returns means; counts are whole numbers, so rounding undoes the division.
        positive = np.rint(fraction.reshape(batch, channels) * spatial).sum(axis=0)
        abs_sum = None
        if out.mean_abs is not None:
            mean_abs = values[out.mean_abs][:rows].astype(np.float64).reshape(batch, channels)
            abs_sum = (mean_abs * spatial).sum(axis=0)
        if self.positive is None:
            self.positive, self.abs_sum = positive, abs_sum
        else:
            self.positive = self.positive + positive
            if abs_sum is not None:
                self.abs_sum = self.abs_sum + abs_sum
        self.elements += batch * spatial

    def result(self) -> TensorStats:
        assert self.positive is not None
        return TensorStats(self.positive, self.abs_sum, self.elements)


def _check_finite(
    values: dict[str, np.ndarray],
    outputs: Sequence[StatOutputs],
    rows: int,
    before: int,
    description: str,
) -> None:
    """Refuse a batch whose reductions are not finite, naming the earliest sample (the
    `before` samples come first) and a tensor it fails at: NaN counts or sums would plan
    silently (a NaN rho reads as no redundancy) or rank channels at random."""
    floats = [v[:rows] for v in values.values() if np.issubdtype(v.dtype, np.floating)]
    if all(np.isfinite(v).all() for v in floats):
        return  # the common case: one check per output, none per tensor
    failing = {}  # tensor -> its first sample that is not finite
    for out in outputs:
        if out.packed_at is not None:
            counts, sums = out.columns()
            packed = values[out.packed][:rows].reshape(rows, -1)
            parts = [packed[:, counts], *([] if sums is None else [packed[:, sums]])]
        else:
            parts = [values[n][:rows].reshape(rows, -1) for n in (out.positive, out.mean_abs) if n]
        finite = np.logical_and.reduce([np.isfinite(p).all(axis=1) for p in parts])
        if not finite.all():
            failing[out.tensor] = int(np.argmin(finite))
    tensor = min(failing, key=failing.__getitem__)
    raise BadInputError(
        f"activation statistics are not finite at {tensor!r} on sample "
        f"{before + failing[tensor]} ({description}): the model computes NaN or inf there, or "
        "values whose sum passes float32's range; fix the model or drop that sample"
    )


def _check_inputs(model: onnx.ModelProto, fed: list[str]) -> None:
    """The data must feed exactly the model's inputs."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    unknown = [name for name in fed if name not in inputs]
    if unknown:
        raise BadInputError(
            f"the data is for input {unknown[0]!r} but the model's inputs are {inputs}"
        )
    if len(inputs) > len(fed):
        raise BadInputError(
            f"the model has several inputs {inputs}; give an .npz with one array per input, "
            "named after it (model-ready data)"
        )


def _run(
    session: ort.InferenceSession,
    input_name: str,
    feed_type: np.dtype,
    numbered: tuple[int, Batch],
) -> list[np.ndarray]:
    """Run batch number `numbered[0]`; on the first, data that does not fit becomes a
    BadInputError."""
    index, batch = numbered
    feeds = batch_feeds(session, input_name, feed_type, batch)
    x = feeds[input_name]
    if index > 0:
        return session.run(None, feeds)
    declared = next(i for i in session.get_inputs() if i.name == input_name)
    expected = tuple(declared.shape)
    fits = len(expected) == x.ndim and all(
        not isinstance(d, int) or d == s for d, s in zip(expected, x.shape, strict=True)
    )
    if not fits:
        raise BadInputError(
            f"data does not fit model input {input_name!r}: expected shape {expected}, "
            f"got {x.shape}"
        )
    try:
        return session.run(None, feeds)
    except Exception as error:  # onnxruntime raises its own exception types
        raise BadInputError(
            f"onnxruntime cannot run the model on this data (input {input_name!r} expects "
            f"{expected}, got {x.shape} {x.dtype}): {str(error).strip().splitlines()[0]}"
        ) from None

"""Top-1 / top-5 accuracy of an ONNX classifier with onnxruntime."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from onnx_mbs.data import Batch, DataSource
from onnx_mbs.data.ready import check_teacher_input
from onnx_mbs.dense_maps import IoU, map_kind
from onnx_mbs.logits import (
    check_label_range,
    check_none_unambiguous,
    check_top1_wanted,
    choose_logits,
    classes_of,
    is_none,
)
from onnx_mbs.passes.domains import is_onnxruntime_op
from onnx_mbs.passes.errors import BadInputError, QuantizedModelError, UninferredShapesError
from onnx_mbs.passes.graph import nested_nodes
from onnx_mbs.passes.load import (
    FixInputShapes,
    InputShapes,
    LoadedModel,
    Origin,
    load,
    read_model,
)
from onnx_mbs.progress import progress_bar
from onnx_mbs.runtime import (
    batch_feeds,
    feed_dtype,
    input_dtype,
    make_session,
    pad_to_batch,
    session_provider,
)
from onnx_mbs.weights_file import HeldModel, runnable_file

if TYPE_CHECKING:
    import onnxruntime as ort


def load_for_eval(
    source: str | os.PathLike | onnx.ModelProto, input_shapes: InputShapes | None = None
) -> LoadedModel:
    """What `eval` runs. A float model is loaded as every command loads it. A quantised one
    (QDQ or QOperator: what onnxruntime's quantisation writes after reduction) is run as it
    is, since the analysis form is for float graphs: its `model` only has the input shapes
    fixed, to fit the data to, and its `runnable` is the graph as read. So is a model that
    onnxruntime optimised (its com.microsoft ops have no ONNX schema: shape inference cannot
    size what they make, and `load` refuses it): it is run as onnxruntime runs it. Only that
    refusal (UninferredShapesError), with an onnxruntime op anywhere in the model (local
    functions and subgraphs included), is run so; any other refusal stands."""
    try:
        return load(source, input_shapes)
    except QuantizedModelError:
        model = read_model(source, quantized=True)
    except UninferredShapesError:
        model = read_model(source)
        if not any(is_onnxruntime_op(n) for n in nested_nodes(model.graph, *model.functions)):
            raise
    fixed = FixInputShapes(input_shapes, batch=1)(model).model
    return LoadedModel(fixed, Origin(declared=model))


@dataclass
class EvalResult:
    top1: float
    top5: float | None  # only when the model has more than 5 classes
    samples: int
    provider: str
    nonfinite: int = 0  # samples whose logits hold NaN or inf: counted as wrong
    output: str = ""  # the output read as logits (`onnx_mbs.logits`)


def _proto(model: onnx.ModelProto | bytes | str | os.PathLike) -> onnx.ModelProto:
    """The graph alone (no external weights): enough to see which nodes make the outputs."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.load_from_string(model)
    return onnx.load(os.fspath(model), load_external_data=False)


def evaluate(
    model: onnx.ModelProto | HeldModel | bytes | str | os.PathLike,
    data: DataSource | str | os.PathLike | Any,
    providers: list[str],
    batch_size: int = 256,
    progress: bool = True,
    logits: str | None = None,
    input_shapes: InputShapes | None = None,
) -> EvalResult:
    """Accuracy of the classifier output (`onnx_mbs.logits`: `logits` names it where the
    model has several), its shape taken from the first batch's run. `data` is a DataSource,
    or a --data spec (or reader) read for the model as `onnx-mbs eval` reads it, fitted to
    `input_shapes` where the model's input dims are dynamic (`--input-shape`). `logits`
    "none" (the model has no classifier output) is refused: there is no top-1 to take.
    A model in memory is run from a file whose weights onnxruntime maps (`runnable_file`);
    a HeldModel is let go once written there."""
    check_top1_wanted(logits)
    if not hasattr(data, "batches"):  # not a DataSource (a Protocol)
        from onnx_mbs.data.fit import open_for_model

        read = model.model if isinstance(model, HeldModel) else model
        data = open_for_model(data, load_for_eval(read, input_shapes).model, logits=logits)
        del read
    with contextlib.ExitStack() as stack:
        model = _as_file(stack, model)
        session = make_session(model, providers)
        return _accuracy(session, _proto(model), data, batch_size, progress, logits)


def _as_file(
    stack: contextlib.ExitStack, model: onnx.ModelProto | HeldModel | bytes | str | os.PathLike
) -> bytes | str | os.PathLike:
    """What onnxruntime is given: a model in memory as a file whose weights it maps
    (`runnable_file`, kept while `stack` is open), bytes or a path as they are."""
    if isinstance(model, (onnx.ModelProto, HeldModel)):
        return stack.enter_context(runnable_file(model))
    return model


def _accuracy(
    session: ort.InferenceSession,
    graph: onnx.ModelProto,
    data: DataSource,
    batch_size: int,
    progress: bool,
    logits: str | None,
) -> EvalResult:
    """`evaluate`'s count over the data, on a session made."""
    logits_name: str | None = None
    dtype = feed_dtype(session, data.input_name, ready=data.preprocess is None)
    correct1 = correct5 = samples = nonfinite = 0
    classes = 0
    bar = progress_bar(len(data), "evaluate", progress)
    with bar:
        for batch in data.batches(batch_size):
            if batch.y is None:
                raise BadInputError(
                    f"evaluation needs labels, but the data has none ({data.description}); "
                    "use an image folder with class sub-folders, an npz with y, or an IDX folder"
                )
            try:
                feeds = batch_feeds(session, data.input_name, dtype, batch)
                if logits_name is None:
                    names = [o.name for o in session.get_outputs()]
                    results = session.run(names, feeds)
                else:
                    results = session.run([logits_name], feeds)
            except Exception as error:  # onnxruntime's own exception types
                if samples:
                    raise
                raise BadInputError(
                    f"onnxruntime cannot run the model on this data (got {batch.x.shape} "
                    f"{batch.x.dtype}): {str(error).strip().splitlines()[0]}"
                ) from None
            if logits_name is None:
                shapes = {n: r.shape for n, r in zip(names, results, strict=True)}
                logits_name = choose_logits(shapes, graph, logits)
                results = [results[names.index(logits_name)]]
            scores = results[0][: len(batch.x)]
            scores = scores.reshape(len(scores), -1)  # (batch, classes, 1, 1) as (batch, classes)
            ranks = label_ranks(scores, batch.y, logits_name)
            classes = scores.shape[1]
            nonfinite += int((~np.isfinite(scores).all(axis=1)).sum())
            correct1 += int((ranks < 1).sum())
            correct5 += int((ranks < 5).sum())
            samples += len(ranks)
            bar.update(len(ranks))
    if samples == 0:
        raise BadInputError(f"no samples in {data.description}")
    top5 = correct5 / samples if classes > 5 else None
    return EvalResult(
        correct1 / samples, top5, samples, session_provider(session), nonfinite, logits_name or ""
    )


def label_ranks(logits: np.ndarray, labels: np.ndarray, output: str = "logits") -> np.ndarray:
    """Position of each label in its row's ranking: 0 = the model's first answer.

    Ties count against the label unless it comes first, as argmax would pick,
    so constant logits do not count as correct everywhere; a row holding NaN or
    inf is never correct (rank = classes).
    """
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise BadInputError(
            f"the model's output '{output}' has shape {logits.shape}; expected logits "
            f"({len(labels)}, classes)"
        )
    classes = logits.shape[1]
    check_label_range(labels, classes, output, "the data")
    target = logits[np.arange(len(labels)), labels][:, None]
    before = np.arange(classes)[None, :] < labels[:, None]
    ranks = ((logits > target) | ((logits == target) & before)).sum(axis=1)
    return np.where(np.isfinite(logits).all(axis=1), ranks, classes)


@dataclass
class OutputAgreement:
    """How closely one output follows the teacher's output of the same name.

    relative_error: ||student - teacher|| / ||teacher|| over all samples; cosine: the mean
    per-sample cosine similarity (1 where both are all zero); top1: the fraction of samples
    whose argmax class agrees (classifier outputs only, `onnx_mbs.logits`); iou: for label
    maps, masks, probability maps and class-probability maps over the input's positions, the
    mean IoU `onnx_mbs.dense_maps` defines; None for any other output (a regression map, a
    detector's grid); map: which of those the graph makes the output (`dense_maps.LABELS`,
    ...), what its IoU is of, None with no IoU. Non-finite student values never count as
    agreeing.
    """

    name: str
    shape: tuple[int, ...]
    relative_error: float
    cosine: float
    top1: float | None = None
    iou: float | None = None
    map: str | None = None


@dataclass
class AgreementResult:
    outputs: list[OutputAgreement]
    samples: int
    provider: str


class _Accumulator:
    """Sums over batches for one output; `result` turns them into an OutputAgreement."""

    def __init__(
        self,
        name: str,
        shape: tuple[int, ...],
        classifier: bool = True,
        graph: onnx.ModelProto | None = None,
    ) -> None:
        self.name, self.shape, self.graph = name, shape, graph
        # argmax agreement for a classifier-shaped output, unless `--logits none` said none is
        self.classifier = classifier and classes_of(shape) is not None
        self.sq_err = self.sq_ref = self.cosine = 0.0
        self.hits = self.count = 0
        self.iou: IoU | None = None
        self.kind: str | None = ""  # "": not read yet; None: no IoU (`dense_maps.map_kind`)

    def add(self, s: np.ndarray, t: np.ndarray) -> None:
        n = len(t)
        s64, t64 = s.reshape(n, -1).astype(np.float64), t.reshape(n, -1).astype(np.float64)
        finite = np.isfinite(s64).all(axis=1)
        self.count += n
        self.sq_err += float(((s64 - t64) ** 2).sum())
        self.sq_ref += float((t64**2).sum())
        s_norm, t_norm = np.linalg.norm(s64, axis=1), np.linalg.norm(t64, axis=1)
        norms = s_norm * t_norm
        cos = np.where(norms > 0, (s64 * t64).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)
        # Both all zero (an empty mask, a map of class 0 only) is exact agreement, not 0.
        cos = np.where((s_norm == 0) & (t_norm == 0), 1.0, cos)
        self.cosine += float(np.where(finite, cos, 0.0).sum())
        if self.classifier:
            self.hits += int(((s64.argmax(1) == t64.argmax(1)) & finite).sum())
        if self.kind == "":
            self.kind = map_kind(self.graph, self.name, t)
            self.iou = IoU(self.kind) if self.kind is not None else None
        if self.iou is not None:
            self.iou.add(s, t, finite)

    def result(self) -> OutputAgreement:
        rel = math.sqrt(self.sq_err / self.sq_ref) if self.sq_ref > 0 else math.sqrt(self.sq_err)
        top1 = self.hits / self.count if self.classifier else None
        iou = self.iou.mean() if self.iou is not None else None
        cosine, kind = self.cosine / self.count, self.kind or None
        return OutputAgreement(self.name, self.shape, rel, cosine, top1, iou, kind)


def agreement(
    model: onnx.ModelProto | HeldModel | bytes | str | os.PathLike,
    teacher: onnx.ModelProto | HeldModel | bytes | str | os.PathLike,
    data: DataSource,
    providers: list[str],
    batch_size: int = 256,
    progress: bool = True,
    logits: str | None = None,
) -> AgreementResult:
    """Agreement of every output of `model` with `teacher`'s same-named output; no labels needed.
    Both are fed the same data: a teacher whose input takes another type is refused
    (`check_teacher_input`, as retrain refuses it). `logits` "none": no output is read as a
    classifier's (no argmax agreement; see `onnx_mbs.logits`). Models in memory are run as
    `evaluate` runs them (`runnable_file`)."""
    with contextlib.ExitStack() as stack:
        model, teacher = _as_file(stack, model), _as_file(stack, teacher)
        session, reference = make_session(model, providers), make_session(teacher, providers)
        # which ops make each output: its IoU rule (`dense_maps`)
        graph = _proto(model)
        return _agreement(session, reference, graph, data, batch_size, progress, logits)


def _agreement(
    session: ort.InferenceSession,
    reference: ort.InferenceSession,
    graph: onnx.ModelProto,
    data: DataSource,
    batch_size: int,
    progress: bool,
    logits: str | None,
) -> AgreementResult:
    """`agreement` on the sessions made (`reference`: the teacher's)."""
    outputs = session.get_outputs()
    names = [o.name for o in outputs]
    declared = {o.name: [d if isinstance(d, int) else None for d in o.shape] for o in outputs}
    check_none_unambiguous(declared, logits)
    missing = [n for n in names if n not in {o.name for o in reference.get_outputs()}]
    if missing:
        raise BadInputError(
            f"the teacher has no output(s) {missing} (its outputs: "
            f"{[o.name for o in reference.get_outputs()]}): agreement compares outputs by name"
        )
    check_teacher_input(*(input_dtype(s, data.input_name) for s in (session, reference)))
    ready = data.preprocess is None
    dtype, teacher_dtype = (
        feed_dtype(session, data.input_name, ready),
        feed_dtype(reference, data.input_name, ready),
    )
    totals: dict[str, _Accumulator] = {}
    samples = 0
    with progress_bar(len(data), "agreement", progress) as bar:
        for batch in data.batches(batch_size):
            try:
                # padded to a fixed batch for the run; only the batch's own rows compared
                ours = _run_rows(session, names, data.input_name, dtype, batch)
                theirs = _run_rows(reference, names, data.input_name, teacher_dtype, batch)
            except Exception as error:  # onnxruntime's own exception types
                if samples:
                    raise
                raise BadInputError(
                    f"onnxruntime cannot run the model or the teacher on this data (got "
                    f"{batch.x.shape}): {str(error).strip().splitlines()[0]}"
                ) from None
            for name, s, t in zip(names, ours, theirs, strict=True):
                if s.shape != t.shape:
                    raise BadInputError(
                        f"output '{name}' has shape {list(s.shape)} in the model but "
                        f"{list(t.shape)} in the teacher: they must match"
                    )
                if name not in totals:
                    # Integers or booleans (indices, a decision) are never a classifier's scores.
                    scores = not is_none(logits) and np.issubdtype(s.dtype, np.floating)
                    totals[name] = _Accumulator(name, tuple(s.shape), scores, graph)
                totals[name].add(s, t)
            samples += len(batch.x)
            bar.update(len(batch.x))
    if samples == 0:
        raise BadInputError(f"no samples in {data.description}")
    return AgreementResult([totals[n].result() for n in names], samples, session_provider(session))


def _run_rows(
    session: ort.InferenceSession, names: list[str], input_name: str, dtype: np.dtype, batch: Batch
) -> list[np.ndarray]:
    """`names` run on `batch` (padded to the session's fixed batch, if it has one): per-sample
    outputs cut back to the batch's own rows."""
    feeds = batch_feeds(session, input_name, dtype, batch)
    fed, rows = len(feeds[input_name]), len(batch.x)
    outputs = session.run(names, feeds)
    return [o[:rows] if o.ndim and len(o) == fed else o for o in outputs]


def finite_rows(
    model: onnx.ModelProto,
    x: np.ndarray,
    input_name: str,
    providers: list[str],
    ready: bool = False,
) -> np.ndarray:
    """Per sample of `x`, whether every output of `model` is finite for it (onnxruntime);
    `ready`: `x` is model-ready data, fed in the input's own type (`feed_dtype`)."""
    session = make_session(model, providers)
    dtype = feed_dtype(session, input_name, ready)
    fed = pad_to_batch(session, input_name, x.astype(dtype, copy=False))
    finite = np.ones(len(x), bool)
    for out in session.run(None, {input_name: fed}):
        out = np.asarray(out)
        if out.ndim and out.shape[0] == len(fed):
            finite &= np.isfinite(out[: len(x)].reshape(len(x), -1)).all(axis=1)
        elif not np.isfinite(out).all():
            finite[:] = False
    return finite


def check_outputs_finite(
    written: onnx.ModelProto,
    original: onnx.ModelProto,
    data: DataSource,
    providers: list[str],
    batch_size: int = 64,
) -> None:
    """Refuse a model about to be written whose outputs are NaN or inf on real samples where
    the model it came from gives finite ones: finite weights can still overflow (retrain with
    too large an --lr, or fp16 weights past 65504)."""
    x = next(iter(data.batches(batch_size))).x
    ready = data.preprocess is None
    bad = finite_rows(original, x, data.input_name, providers, ready) & ~finite_rows(
        written, x, data.input_name, providers, ready
    )
    if bad.any():
        raise BadInputError(
            f"the retrained model gives NaN or inf outputs on {int(bad.sum())} of {len(x)} "
            "training samples where the input model's are finite; nothing written: lower --lr"
        )

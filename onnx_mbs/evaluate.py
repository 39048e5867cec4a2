"""Top-1 / top-5 accuracy of an ONNX classifier with onnxruntime."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_mbs.data import DataSource
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.progress import progress_bar
from onnx_mbs.runtime import feed_dtype, make_session, pad_to_batch, session_provider


@dataclass
class EvalResult:
    top1: float
    top5: float | None  # only when the model has more than 5 classes
    samples: int
    provider: str
    nonfinite: int = 0  # samples whose logits hold NaN or inf: counted as wrong


def evaluate(
    model: onnx.ModelProto | bytes | str | os.PathLike,
    data: DataSource,
    providers: list[str],
    batch_size: int = 256,
    progress: bool = True,
) -> EvalResult:
    """Accuracy with the first model output taken as logits (N, classes)."""
    session = make_session(model, providers)
    logits_name = session.get_outputs()[0].name
    dtype = feed_dtype(session, data.input_name)
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
                x = pad_to_batch(session, data.input_name, batch.x.astype(dtype, copy=False))
                logits = session.run([logits_name], {data.input_name: x})[0][: len(batch.x)]
            except Exception as error:  # onnxruntime's own exception types
                if samples:
                    raise
                raise BadInputError(
                    f"onnxruntime cannot run the model on this data (got {batch.x.shape} "
                    f"{batch.x.dtype}): {str(error).strip().splitlines()[0]}"
                ) from None
            ranks = label_ranks(logits, batch.y)
            classes = logits.shape[1]
            nonfinite += int((~np.isfinite(logits).all(axis=1)).sum())
            correct1 += int((ranks < 1).sum())
            correct5 += int((ranks < 5).sum())
            samples += len(ranks)
            bar.update(len(ranks))
    if samples == 0:
        raise BadInputError(f"no samples in {data.description}")
    top5 = correct5 / samples if classes > 5 else None
    return EvalResult(correct1 / samples, top5, samples, session_provider(session), nonfinite)


def label_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Position of each label in its row's ranking: 0 = the model's first answer.

    Ties count against the label unless it comes first, as argmax would pick,
    so constant logits do not count as correct everywhere; a row holding NaN or
    inf is never correct (rank = classes).
    """
    if logits.ndim != 2 or logits.shape[0] != len(labels):
        raise BadInputError(
            f"the model's first output has shape {logits.shape}; expected logits "
            f"({len(labels)}, classes)"
        )
    classes = logits.shape[1]
    if labels.max(initial=0) >= classes:
        raise BadInputError(
            f"label {int(labels.max())} does not exist: the model has {classes} classes"
        )
    target = logits[np.arange(len(labels)), labels][:, None]
    before = np.arange(classes)[None, :] < labels[:, None]
    ranks = ((logits > target) | ((logits == target) & before)).sum(axis=1)
    return np.where(np.isfinite(logits).all(axis=1), ranks, classes)

"""Which IoU a dense output's agreement with the teacher has, read from the graph, not guessed
from the values: one rule for `eval --teacher`.

A map has an IoU only where its axes are the input's positions: its rank is the input's
((batch, C, H, W) of a (batch, 3, H, W) image, (batch, C, D, H, W) of a volume), or one less
for a label map without its class axis ((batch, H, W)). A YOLO head's (batch, anchors, H, W,
5 + classes) grid has one axis more: a Sigmoid over it holds box coordinates, objectness and
class scores, where a foreground at 0.5 per anchor measures nothing, as its class ids or a
Softmax over its anchors do. Within that rule:

- **label map**: an output an ArgMax makes ((batch, H, W), or (batch, 1, H, W) or (batch, H,
  W, 1) with keepdims; through reshapes, slices, a max pool, a nearest Resize or a Cast, to
  float too: `logits.label_source`, by which `retrain` trains such an output, at any rank, on
  the ArgMax's scores): the mean over the classes either map holds of each class's IoU.
- **mask**: a boolean output whose last two dims are above 1: the IoU of its True pixels.
- **probability map**: a float (batch, C, H, W[, ...]) output a Sigmoid or HardSigmoid makes,
  maybe resized (nearest or linear: values stay in [0, 1]), pooled, sliced or concatenated with
  others on the way: each channel thresholded at 0.5, the mean over channels of the IoU of its
  foreground.
- **class probabilities**: a float (batch, C, H, W[, ...]) map a Softmax or LogSoftmax over
  axis 1 makes (the same ops on the way): the argmax over the classes, then as a label map.
- anything else has no IoU, only the relative error and cosine: a Conv's raw output (box
  regression, depth, offsets, raw class scores: the graph cannot tell them apart), where a
  threshold or an argmax over regression channels measures nothing; a (batch, boxes, 85)
  Sigmoid output of a detector (rank 3: not a map) or its (batch, anchors, H, W, 85) grid;
  integer outputs other ops make (indices, counts). A YOLO head with a Sigmoid over its
  Conv's (batch, anchors * (5 + classes), H, W) output, not viewed per anchor, looks to the
  graph like a multi-label probability map and gets its IoU.

IoUs are summed over all samples per class before dividing (the dataset's IoU, not a mean of
per-image ones); a class neither map holds anywhere is left out of the mean; a sample whose
student output is not finite matches no pixel.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import onnx

from onnx_mbs.data.ready import declared_inputs
from onnx_mbs.logits import RESIZES, Producers, label_source, producers_of, resize_mode
from onnx_mbs.passes.domains import op_id
from onnx_mbs.passes.graph import attributes, default_opset

LABELS, MASK, PROBABILITIES, CLASSES = "labels", "mask", "probabilities", "classes"

# What each kind's IoU is of, for the line `eval --teacher` prints under its table.
OF = {
    LABELS: "label map (mean IoU over classes)",
    MASK: "mask (IoU of its True pixels)",
    PROBABILITIES: "probability map (foreground at 0.5, mean over channels)",
    CLASSES: "class probabilities (IoU of their argmax, mean over classes)",
}


def iou_note(kinds: Mapping[str, str | None], dense: Collection[str]) -> str | None:
    """One line saying what each output's IoU (`kinds`: name -> kind, None: no IoU) is of, and
    why the `dense` outputs without one (rank 3 or more, no top-1) have none; None where no
    output has one and none is dense (a classifier's logits)."""
    said = [
        ", ".join(f"'{n}'" for n, k in kinds.items() if k == kind) + f" {what}"
        for kind, what in OF.items()
        if kind in kinds.values()
    ]
    if none := [n for n in dense if kinds.get(n) is None]:
        said.append(
            f"none for {', '.join(repr(n) for n in none)}: not a label map, mask or "
            "probability map over the input's positions (raw scores, regression, a detector's "
            "boxes or grid), relative error and cosine only"
        )
    return "IoU: " + "; ".join(said) if said else None


# Ops a probability passes through and stays one (in [0, 1], channels where they were).
_KEEPS = {
    "Identity",
    "Cast",
    "Slice",
    "Split",
    "MaxPool",
    "AveragePool",
    "Dropout",
    "Squeeze",
    "Unsqueeze",
    "Reshape",
    "Flatten",
}


def map_kind(model: onnx.ModelProto | None, name: str, sample: np.ndarray) -> str | None:
    """The IoU rule of output `name` (see the module), from its first batch `sample` and the
    graph that makes it; None: no IoU."""
    rank, image = sample.ndim, input_rank(model)
    if sample.dtype == np.bool_:
        spread = rank >= 3 and min(sample.shape[-2:]) > 1
        return MASK if spread and rank in (image - 1, image) else None
    if model is None or rank < 3:
        return None
    made = _made_by(producers_of(model), default_opset(model), name, rank)
    if made == LABELS or np.issubdtype(sample.dtype, np.integer):  # labels Cast to float too
        # Without its class axis, or with it kept as 1 (ArgMax keepdims).
        kept = rank == image and 1 in (sample.shape[1], sample.shape[-1])
        return LABELS if made == LABELS and (rank == image - 1 or kept) else None
    floating = np.issubdtype(sample.dtype, np.floating)
    maps = (PROBABILITIES, CLASSES)
    return made if floating and rank == image >= 4 and made in maps else None


def input_rank(model: onnx.ModelProto | None) -> int:
    """The rank of the input a model's maps are positions of: its first graph input that no
    initializer fills (`declared_inputs`), where declared; 4 (an image batch) otherwise."""
    inputs = declared_inputs(model) if model is not None else []
    return len(inputs[0].dims) if inputs and inputs[0].dims else 4


def _made_by(producers: Producers, opset: int, name: str, rank: int) -> str | None:
    """LABELS where `name` is an ArgMax's label map (`logits.label_source`, the rule retrain
    trains by); PROBABILITIES or CLASSES where the ops making it end in a Sigmoid or a
    class-axis Softmax, through ops that keep its values and channels; else None."""
    if label_source(producers, name) is not None:
        return LABELS
    node = producers.get(name)
    while node is not None:
        op = op_id(node)
        if op == "ArgMax":
            return None  # labels averaged or interpolated (`label_source` stopped short)
        if op in ("Sigmoid", "HardSigmoid"):
            return PROBABILITIES
        if op in ("Softmax", "LogSoftmax"):
            axis = attributes(node).get("axis", -1 if opset >= 13 else 1)
            return CLASSES if axis in (1, 1 - rank) else None
        if op == "Concat":
            kinds = {_made_by(producers, opset, i, rank) for i in node.input if i}
            return PROBABILITIES if kinds == {PROBABILITIES} else None
        mode = resize_mode(node) if op in RESIZES else None
        if op not in _KEEPS and mode not in ("nearest", "linear"):
            return None
        if not node.input:
            return None
        node = producers.get(node.input[0])
    return None


def label_maps(kind: str, s: np.ndarray, t: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(student, teacher) integer maps to take per-class IoUs of, one pair per channel of a
    probability map, one pair otherwise."""
    if kind == CLASSES:
        return [(s.argmax(1), t.argmax(1))]
    if kind == PROBABILITIES:
        s, t = (s, t) if s.ndim >= 4 else (s[:, None], t[:, None])
        return [((s[:, c] > 0.5).astype(np.int64), (t[:, c] > 0.5).astype(np.int64))
                for c in range(s.shape[1])]  # fmt: skip
    return [(s.astype(np.int64), t.astype(np.int64))]


class IoU:
    """Per-class intersections and unions summed over batches; `mean` is the IoU reported."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.inter: dict[tuple[int, int], float] = {}
        self.union: dict[tuple[int, int], float] = {}

    def add(self, s: np.ndarray, t: np.ndarray, finite: np.ndarray) -> None:
        for channel, (sm, tm) in enumerate(label_maps(self.kind, s, t)):
            sm = np.where(finite.reshape((-1,) + (1,) * (sm.ndim - 1)), sm, -1)
            # Foreground only for masks and probability maps; every class of a label map.
            fore = self.kind in (MASK, PROBABILITIES)
            classes = [1] if fore else np.union1d(np.unique(sm[sm >= 0]), np.unique(tm))
            for c in classes:
                key = (channel, int(c))
                a, b = sm == c, tm == c
                self.inter[key] = self.inter.get(key, 0.0) + float((a & b).sum())
                self.union[key] = self.union.get(key, 0.0) + float((a | b).sum())

    def mean(self) -> float:
        present = [k for k, u in self.union.items() if u > 0]
        return float(np.mean([self.inter[k] / self.union[k] for k in present])) if present else 1.0

"""Which graph output holds the classifier's scores: one rule for `eval`, `retrain` and the
label check, so the three never read different outputs.

A classifier output has shape (batch, classes) with more than one class, or (batch, classes,
1, ..., 1) (a 1x1-Conv head without Flatten, SqueezeNet style), and floats: an integer or
boolean output of that shape (TopK indices, a multi-label decision) holds no scores. An
output that is the Softmax of another such output (logits and probabilities both exported)
is the same classifier and gives way to it. One candidate left: it is the logits. Several:
the user names one (`--logits OUTPUT`); none, e.g. a (batch, 1) binary score: there is no
top-1 to take. The rule reads shapes (and types) alone, so a regression head of K > 1
values ((batch, 4) box coordinates, an angle's (sin, cos)) looks like logits: `--logits none`
(`NONE`) says the model has none, and no output is then read as one (no top-1, no label
check, no KL by default).

Probabilities (an output a class-axis Softmax makes) rank classes as their logits do, but
cross-entropy and temperature KL on them are on the wrong scale (the loss cannot fall below
log(1 + (K-1)/e) and the gradients vanish as the model grows confident): training reads the
Softmax's input instead (`softmax_input`). LogSoftmax outputs are logits already (shifted per
row, which softmax ignores).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnx_mbs.passes.domains import op_id
from onnx_mbs.passes.errors import BadInputError, option
from onnx_mbs.passes.graph import FLOAT_TYPES, attributes, default_opset

Shape = Sequence[int | None]  # None (or 0): a dim not known

NONE = "none"  # `--logits none` / `logits="none"`: no output is a classifier's


def is_none(chosen: str | None) -> bool:
    """Whether the user's `--logits` says the model has no classifier output."""
    return chosen == NONE


def check_none_unambiguous(shapes: Mapping[str, Shape], chosen: str | None) -> None:
    """`--logits none` also spells the name of an output called 'none': where that output is
    classifier-shaped (it could be the logits) the two readings differ, and neither is taken
    silently: refused in one line. A 'none' output that cannot be logits leaves it the keyword."""
    if not is_none(chosen) or NONE not in shapes or classes_of(shapes[NONE]) is None:
        return
    raise BadInputError(
        f"the model has a classifier-shaped output {_described([NONE], shapes)}, so "
        f"{option('--logits', NONE)} could name it or say the model has no classifier "
        f"output: rename that output to tell them apart (where it is the only classifier-shaped "
        f"output, leaving {option('--logits')} out reads it as the logits)"
    )


def classes_of(shape: Shape) -> int | None:
    """K for a (batch, K) or (batch, K, 1, ..., 1) shape with a known K > 1, else None."""
    if len(shape) < 2 or any(d != 1 for d in shape[2:]):
        return None
    k = shape[1]
    return k if k and k > 1 else None


def declared_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Each graph output's declared shape, None for a dim that is not a fixed number."""
    return {
        o.name: [d.dim_value or None for d in o.type.tensor_type.shape.dim]
        for o in model.graph.output
    }


_RESHAPES = {"Identity", "Flatten", "Reshape", "Squeeze", "Unsqueeze"}


Producers = Mapping[str, onnx.NodeProto]  # tensor -> the node that makes it


def producers_of(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def softmax_input(
    model: onnx.ModelProto,
    output: str,
    ops: tuple[str, ...] = ("Softmax",),
    producers: Producers | None = None,
) -> str | None:
    """The tensor a class-axis Softmax (or another of `ops`) turns into `output` (through
    Identity, Flatten, Reshape, Squeeze or Unsqueeze), or None: where training finds the
    logits of a probabilities output. `producers` is `producers_of(model)` where the caller
    asks about several outputs."""
    producers = producers_of(model) if producers is None else producers
    node, reshaped = producers.get(output), False
    while node is not None and op_id(node) in _RESHAPES and node.input:
        reshaped = reshaped or op_id(node) != "Identity"
        node = producers.get(node.input[0])
    if node is None or op_id(node) not in ops or not node.input:
        return None
    axis = attributes(node).get("axis", 1 if default_opset(model) < 13 else -1)
    rank = len(declared_shapes(model).get(output, ()))
    # axis 1 is the class axis; -1 is too where the Softmax's own output is (batch, classes).
    if axis == 1 or (axis == -1 and rank == 2 and not reshaped):
        return node.input[0]
    return None


# Ops a label map passes through and stays one (class ids, each where it was or dropped):
# reshapes, a Cast (to float too), slices, a max pool, and a nearest Resize (`_keeps_labels`).
# A linear Resize or an average pool makes values between ids.
_LABEL_KEEPS = _RESHAPES | {"Cast", "Slice", "Split", "Dropout", "MaxPool"}


RESIZES = ("Resize", "Upsample")


def resize_mode(node: onnx.NodeProto) -> str:
    """A Resize's or Upsample's interpolation mode, as text ("nearest" when not given)."""
    mode = attributes(node).get("mode", b"nearest")
    return mode.decode() if isinstance(mode, bytes) else mode


def _keeps_labels(node: onnx.NodeProto) -> bool:
    if op_id(node) in RESIZES:
        return resize_mode(node) == "nearest"
    return op_id(node) in _LABEL_KEEPS


def label_source(producers: Producers, name: str) -> onnx.NodeProto | None:
    """The ArgMax whose label map tensor `name` is (through ops that keep class ids:
    `_LABEL_KEEPS`, a nearest Resize), or None. One rule for what `retrain` trains on the
    ArgMax's scores (`argmax_inputs`) and what `eval --teacher` gives a label IoU
    (`dense_maps`, where the map is over the input's positions)."""
    node = producers.get(name)
    while node is not None and node.input and _keeps_labels(node):
        node = producers.get(node.input[0])
    return node if node is not None and op_id(node) == "ArgMax" and node.input else None


def argmax_inputs(model: onnx.ModelProto) -> dict[str, tuple[str, int]]:
    """{output: (the scores its ArgMax reads, the ArgMax's axis as given)} for the outputs
    that are an ArgMax's label map (`label_source`): a segmentation net's. Integer labels
    carry no gradient, so training compares the scores the ArgMax decides on, along its axis:
    a Softmax's input where the ArgMax reads its probabilities along its axis (KL on values
    in [0, 1], softmax(p / T) nearly uniform, is some 50 times weaker), as `softmax_inputs`."""
    producers, found, opset = producers_of(model), {}, default_opset(model)
    graph = model.graph
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*graph.input, *graph.value_info, *graph.output)
        if v.type.tensor_type.HasField("shape")
    }
    for output in graph.output:
        if (node := label_source(producers, output.name)) is not None:
            axis = int(attributes(node).get("axis", 0))
            scores = node.input[0]
            softmax = producers.get(scores)
            if softmax is not None and _softmax_along(softmax, axis, ranks.get(scores), opset):
                scores = softmax.input[0]
            found[output.name] = (scores, axis)
    return found


def _softmax_along(node: onnx.NodeProto, axis: int, rank: int | None, opset: int) -> bool:
    """Whether `node` is a Softmax normalising each position along `axis` alone (its output
    of `rank`, if known): from opset 13 along its axis; before, over every axis from its own
    on at once, which is one axis only where that is the last."""
    if op_id(node) != "Softmax" or not node.input:
        return False
    own = attributes(node).get("axis", 1 if opset < 13 else -1)
    if opset >= 13 and own == axis:
        return True
    same = rank is not None and own % rank == axis % rank
    return same and (opset >= 13 or own % rank == rank - 1)


def softmax_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """{output: the input of the Softmax that makes it} for the model's probability outputs."""
    producers = producers_of(model)
    found = {o.name: softmax_input(model, o.name, producers=producers) for o in model.graph.output}
    return {name: pre for name, pre in found.items() if pre is not None}


def non_float(model: onnx.ModelProto | None) -> dict[str, str]:
    """{output: its element type, lower case} for the outputs declared to hold integers or
    booleans (indices, counts, a multi-label decision): never scores, whatever their shape."""
    if model is None:
        return {}
    return {
        o.name: onnx.TensorProto.DataType.Name(elem).lower()
        for o in model.graph.output
        if (elem := o.type.tensor_type.elem_type) and elem not in FLOAT_TYPES
    }


def classifier_outputs(shapes: Mapping[str, Shape], model: onnx.ModelProto | None) -> list[str]:
    """The float outputs that are classifier scores (see the module), the Softmax of another
    left out."""
    held = non_float(model)
    found = [n for n, shape in shapes.items() if classes_of(shape) is not None and n not in held]
    if model is None:
        return found
    producers = producers_of(model)
    sources = {n: identity_source(producers, n) for n in found}
    return [
        n
        for n in found
        if (pre := softmax_input(model, n, ("Softmax", "LogSoftmax"), producers)) is None
        or identity_source(producers, pre) not in {s for m, s in sources.items() if m != n}
    ]


def identity_source(producers: Producers, name: str) -> str:
    """`name` followed back through Identity nodes: two outputs of one tensor meet there."""
    while (node := producers.get(name)) is not None and op_id(node) == "Identity":
        name = node.input[0]
    return name


def _described(names: Sequence[str], shapes: Mapping[str, Shape]) -> str:
    """`'emb' (batch, 128), 'logits' (batch, 10)`: each output with its shape."""

    def dims(shape: Shape) -> str:
        return ", ".join(["batch", *(str(d) if d else "?" for d in shape[1:])][: len(shape)])

    return ", ".join(f"'{n}' ({dims(shapes[n])})" for n in names)


def _check_named(shapes: Mapping[str, Shape], chosen: str) -> None:
    if chosen not in shapes:
        raise BadInputError(
            f"{option('--logits')} names output '{chosen}' the model does not have; its "
            f"outputs are {list(shapes)}"
        )


def choose_logits(
    shapes: Mapping[str, Shape],
    model: onnx.ModelProto | None,
    chosen: str | None = None,
    *,
    required: bool = True,
) -> str | None:
    """The output read as logits: `chosen` (the user's `--logits`) if given, else the one
    classifier output. None when there is none or several and `required` is False; refused in
    one line otherwise. `chosen` "none" (`NONE`): the user says no output is: None (a caller
    that needs logits refuses with `check_top1_wanted` first)."""
    check_none_unambiguous(shapes, chosen)
    if is_none(chosen):
        return None
    if chosen is not None:
        _check_named(shapes, chosen)
        if classes_of(shapes[chosen]) is None:
            raise BadInputError(
                f"{option('--logits')} output {_described([chosen], shapes)} is not a "
                "classifier's: logits are (batch, classes) with more than one class"
            )
        if (kind := non_float(model).get(chosen)) is not None:
            raise BadInputError(
                f"{option('--logits')} output {_described([chosen], shapes)} holds {kind} "
                "values, not a classifier's scores: logits are floats"
            )
        return chosen
    found = classifier_outputs(shapes, model)
    if len(found) == 1:
        return found[0]
    if not required:
        return None
    if found:
        raise BadInputError(
            f"the model has {len(found)} classifier-shaped outputs ({_described(found, shapes)}): "
            f"name the logits with {option('--logits', 'OUTPUT')}"
        )
    raise BadInputError(_no_classifier(shapes))


def _no_classifier(shapes: Mapping[str, Shape]) -> str:
    binary = any(len(s) >= 2 and all(d == 1 for d in s[1:]) for s in shapes.values())
    return (
        f"the model has no classifier output (batch, classes) with more than one class among "
        f"its outputs ({_described(list(shapes), shapes)})"
        + (
            "; a (batch, 1) score is a binary classifier's, which has no top-1 to take"
            if binary
            else ""
        )
    )


def _said_none() -> str:
    return (
        f"{option('--logits', NONE)} says the model has no classifier output: there is no "
        "top-1 to take from labels"
    )


def check_top1_wanted(chosen: str | None, model: onnx.ModelProto | None = None) -> None:
    """A top-1 from labels is asked for: refused in one line where `--logits none` said the
    model has no classifier output (or, given `model`, might name its output 'none')."""
    if model is not None:
        check_none_unambiguous(declared_shapes(model), chosen)
    if is_none(chosen):
        raise BadInputError(
            f"{_said_none()}; `onnx-mbs eval --teacher ORIGINAL` (Python: "
            "onnx_mbs.evaluate.agreement) measures agreement with the original instead"
        )


def no_top1(model: onnx.ModelProto, chosen: str | None = None) -> str:
    """Why labelled data gives `model` (one `has_top1` says has none) no top-1, in one line."""
    why = _said_none() if is_none(chosen) else _no_classifier(declared_shapes(model))
    return (
        f"no top-1: {why}; the labels are not used "
        "(`onnx-mbs eval --teacher` measures the reduced model's agreement with the original)"
    )


def has_top1(model: onnx.ModelProto, chosen: str | None = None) -> bool:
    """Before running it: whether `model` may have a classifier output, by its declared shapes
    (a dim not known could be the classes); several that are refused in one line, as a `chosen`
    name the model does not have, so that a run does not find out after its work is done.
    `chosen` "none": it has none."""
    shapes = declared_shapes(model)
    check_none_unambiguous(shapes, chosen)
    if is_none(chosen):
        return False
    if chosen is not None:
        _check_named(shapes, chosen)
        return True
    if len(classifier_outputs(shapes, model)) > 1:
        choose_logits(shapes, model)  # refused, naming them
    held = non_float(model)
    return any(
        len(s) >= 2 and s[1] != 1 and all(d in (1, None) for d in s[2:]) and n not in held
        for n, s in shapes.items()
    )


def check_label_range(labels: np.ndarray, classes: int, output: str, where: str) -> None:
    """Every label must name one of the `classes` of the logits output `output`."""
    if len(labels) and int(labels.max()) >= classes:
        raise BadInputError(
            f"label {int(labels.max())} in {where} does not exist: the model's logits "
            f"'{output}' have {classes} classes (0..{classes - 1})"
        )

"""Initializers the user keeps out of training (`retrain --freeze NAME[,NAME...]`).

Shape alone cannot tell a detector's stride vector (1, 84) or a DFL arange weight from a
channels-last bias, so such tables train unless named here. A frozen parameter is marked not
trainable (requires_grad False), the mechanism `train._freeze_unread` uses for weights no loss
reaches: the optimizer then leaves it out, weight decay included. A frozen BatchNorm statistic
(a buffer, which training updates in place) is put back after every epoch, before validation
measures the model as it will be written, and again before the weights are written.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import onnx
import torch

from onnx_mbs.bridge.bn import InsertedBN
from onnx_mbs.bridge.module import OnnxModule
from onnx_mbs.passes.domains import op_id
from onnx_mbs.passes.errors import BadInputError, option


def check_frozen(
    names: Sequence[str] | str, model: onnx.ModelProto, teacher: onnx.ModelProto | None = None
) -> list[str]:
    """The names, each an initializer of `model` (or a Constant's output), deduplicated in
    their order, each followed by the copies `reduce` made of it (`NAME__1`, ...: a table read
    by several nodes, sliced apart for each; the first slice keeps the name). One that is not
    an initializer is refused in one line naming close ones, and saying so where the teacher
    (the model before `reduce`) has it: reduce cut it (a layer removed whole)."""
    if isinstance(names, str):  # "a,b" as the command line gives it
        names = names.split(",")
    names = list(dict.fromkeys(n.strip() for n in names if n.strip()))
    inits = [t.name for t in model.graph.initializer]
    # A Constant's table trains as an initializer of its name (`untie_initializers`), if at all.
    inits += [n.output[0] for n in model.graph.node if op_id(n) == "Constant" and n.output]
    known = set(inits)
    for name in names:
        if name in known:
            continue
        close = difflib.get_close_matches(name, inits, n=5)
        near = f"; close names: {', '.join(close)}" if close else ""
        cut = teacher is not None and name in {t.name for t in teacher.graph.initializer}
        folded = _folded_into(name, teacher, known) if cut and teacher is not None else None
        why = (
            f"{option('--teacher')} has it, and reduce folded it into '{folded}' (a constant "
            "computed from it): freeze that"
            if folded
            else f"{option('--teacher')} has it, so reduce cut it from this model (nothing of "
            "it is left to train)"
            if cut
            else "it is not an initializer of the model being retrained"
        )
        raise BadInputError(f"{option('--freeze')} names '{name}': {why}{near}")
    copies = re.compile(rf"({'|'.join(map(re.escape, names))})__\d+") if names else None
    found = [n for n in inits if copies is not None and copies.fullmatch(n)]
    return list(dict.fromkeys([*names, *found]))


def _folded_into(name: str, teacher: onnx.ModelProto, known: set[str]) -> str | None:
    """The initializer of the retrained model that loading computed from teacher initializer
    `name` (constant subgraphs are folded, e.g. a DFL arange reshaped): the first one found
    among the teacher's tensors computed from `name` and constants alone, else None."""
    constant = {t.name for t in teacher.graph.initializer} | {""}
    made = {name}  # tensors computed from `name` and constants alone
    for node in teacher.graph.node:  # in order: an ONNX graph's nodes are sorted
        if not all(i in constant for i in node.input):
            continue
        constant.update(node.output)
        if not made & set(node.input):
            continue
        made.update(node.output)
        found = [out for out in node.output if out in known]
        if found:
            return found[0]
    return None


def check_not_folded(names: Sequence[str], inserted: Sequence[InsertedBN]) -> None:
    """A re-inserted BatchNorm is folded back into its Conv's weight and bias after training,
    which would change them: a frozen one is refused in one line."""
    for bn in inserted:
        for name in (bn.weight, bn.bias):
            if name in names:
                raise BadInputError(
                    f"{option('--freeze')} names '{name}' of Conv '{bn.conv}', which gets a "
                    "BatchNorm re-inserted for training (a BN-folded graph) that is folded back "
                    "into it: turn re-insertion off to keep it unchanged (--no-bn-reinsert; "
                    "Python: reinsert_bn=False)"
                )


def freeze(student: OnnxModule, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Mark the named parameters not trainable; returns every named tensor's value now, for
    `restore` (a buffer is updated by training whatever its requires_grad says). Freezing
    every parameter is refused in one line: there is nothing to train."""
    kept = {}
    for name in names:
        if name not in student.initializer_keys:  # a constant: nothing trains it
            continue
        tensor = student.initializer(name)
        tensor.requires_grad_(False)
        kept[name] = tensor.detach().clone()
    if kept and not any(p.requires_grad for p in student.parameters()):
        raise BadInputError(
            f"{option('--freeze')} leaves nothing to train: it names every trainable weight"
        )
    return kept


@torch.no_grad()
def restore(student: OnnxModule, kept: dict[str, torch.Tensor]) -> None:
    """Put the frozen values back (BatchNorm statistics the forward passes updated)."""
    for name, value in kept.items():
        student.initializer(name).copy_(value)

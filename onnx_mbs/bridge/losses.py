"""Distillation losses for any graph outputs: classifier logits, boxes, score maps, features.

Each graph output is compared with the teacher's output of the same name. The default loss follows
the output's shape: a (batch, classes) or (batch, classes, 1, 1) output is classifier logits and
gets Hinton's KL with temperature (read before the Softmax of a probabilities output, `train.py`);
anything else (detection heads, dense maps, embeddings) gets the squared error divided by the
teacher output's squared norm over the batch -- the square of the relative error `eval --teacher`
reports -- so outputs of different scales weigh alike. (Dividing by the variance
instead blows up on nearly constant outputs such as a probability map of mostly background.)
A label map an in-graph ArgMax makes (integers: no gradient) is compared through the class
scores the ArgMax reads (`onnx_mbs.logits.argmax_inputs`), by KL along the ArgMax's axis at
every position (pixel-wise distillation): the ArgMax decides on the scores' differences, which
a squared error relative to the scores' size, offset included, barely sees.
Outputs whose losses read the same tensors (logits exported with their Softmax, LogSoftmax or
ArgMax: each KL reads the logits) are one term, counted once (`shared_terms`), so that one
classifier weighs as one against the cross-entropy and the other outputs.
`--loss NAME=kl|mse|none` overrides. The shape rule cannot tell a (batch, 4) box or an angle's
(sin, cos) from logits, and KL ignores a per-sample shift a regression output must not drift by:
`--logits none` says the model has no logits, and every output then defaults to mse.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import torch
import torch.nn.functional as F

from onnx_mbs.logits import classes_of, is_none
from onnx_mbs.passes.errors import BadInputError, keyword, on_command_line, option

KINDS = ("kl", "mse", "none")


def parse_loss_specs(specs: Sequence[str] | None) -> dict[str, str]:
    """`["out=mse", ...]` -> {"out": "mse"}; one line of error for a malformed or unknown kind."""
    chosen: dict[str, str] = {}
    for spec in specs or []:
        name, sep, kind = spec.rpartition("=")
        if not sep or not name:
            raise BadInputError(f"--loss takes OUTPUT=KIND, got {spec!r}")
        if kind not in KINDS:
            raise BadInputError(
                f"unknown loss {kind!r} for output '{name}': choose one of {', '.join(KINDS)}"
            )
        chosen[name] = kind
    return chosen


def left_out(names: Sequence[str]) -> str:
    """The options that give `names` no loss, as the door in use spells them: `--loss a=none
    --loss b=none`, `losses={'a': 'none', 'b': 'none'}`."""
    if on_command_line():
        return " ".join(option("--loss", f"{n}=none") for n in names)
    return f"{keyword('--loss')}={dict.fromkeys(names, 'none')!r}"


def is_logits(shape: Sequence[int]) -> bool:
    """Classifier-shaped: (batch, classes[, 1, 1]) with more than one class (`onnx_mbs.logits`)."""
    return classes_of(shape) is not None


def default_loss(shape: Sequence[int], logits: str | None = None) -> str:
    """kl for a classifier-shaped output, mse otherwise; mse for every output where the user
    said the model has no logits (`--logits none`: a (batch, 4) box head is not one)."""
    return "kl" if is_logits(shape) and not is_none(logits) else "mse"


def default_losses(
    shapes: Mapping[str, Sequence[int]], logits: str | None = None, label_maps: Collection[str] = ()
) -> dict[str, str]:
    """The loss of each output where the user names none: kl for a label map (`label_maps`:
    outputs an ArgMax makes, trained on its scores), else by shape (`default_loss`)."""
    return {n: "kl" if n in label_maps else default_loss(s, logits) for n, s in shapes.items()}


def choose_losses(
    shapes: Mapping[str, Sequence[int]],
    chosen: Mapping[str, str] | None = None,
    logits: str | None = None,
    label_maps: Collection[str] = (),
) -> dict[str, str]:
    """The loss of each output: the user's choice where given, else by shape (see the module);
    `logits` "none": no output is logits, so none is kl. `label_maps`: outputs an ArgMax makes,
    kl along its axis by default (`shapes` gives their scores' shapes)."""
    chosen = dict(chosen or {})
    unknown = sorted(set(chosen) - set(shapes))
    if unknown:
        raise BadInputError(
            f"{option('--loss')} names output(s) {unknown} the model does not have; its "
            f"outputs are {list(shapes)}"
        )
    kinds = default_losses(shapes, logits, label_maps) | chosen
    for name, kind in kinds.items():
        if kind != "kl" or name in label_maps:
            continue
        if is_none(logits):
            raise BadInputError(
                f"{option('--loss', f'{name}=kl')} reads '{name}' as logits, but "
                f"{option('--logits', 'none')} says the model has none: use mse, or drop "
                f"{option('--logits', 'none')}"
            )
        if not is_logits(shapes[name]):
            raise BadInputError(
                f"output '{name}' has shape {list(shapes[name])}: the kl loss needs "
                "(batch, classes) logits; use mse"
            )
    if all(kind == "none" for kind in kinds.values()):
        raise BadInputError("every output's loss is 'none': nothing to distil")
    return kinds


def shared_terms(
    kinds: Mapping[str, str],
    reads: Mapping[str, tuple[str, str]],
    axes: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """{output: the output whose loss term it repeats}, for the outputs whose loss compares
    the same student and teacher tensors (`reads`, through Identity nodes) by the same kind
    along the same class axis (`axes`, 1 where not given) as another: the Softmax, LogSoftmax
    and ArgMax of exported logits are trained on the logits, the same KL again. The output that
    is the tensor it reads keeps the term (else the first)."""
    axes, owner, shared = axes or {}, {}, {}
    for name in sorted(kinds, key=lambda n: reads[n][0] != n):
        if kinds[name] == "none":
            continue
        key = (*reads[name], kinds[name], axes.get(name, 1))
        if key in owner:
            shared[name] = owner[key]
        else:
            owner[key] = name
    return shared


def kd_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int = 1
) -> torch.Tensor:
    """Hinton distillation: KL between temperature-softened distributions, scaled by T^2;
    over `dim`, averaged over every other position (the batch of (batch, classes) logits, the
    pixels too of a label map's scores)."""
    t = temperature
    if student.dim() == 2 and dim in (1, -1):
        return F.kl_div(
            F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean"
        ) * (t * t)
    kl = F.kl_div(
        F.log_softmax(student / t, dim=dim), F.softmax(teacher / t, dim=dim), reduction="none"
    )
    return kl.sum(dim).mean() * (t * t)


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||student - teacher||^2 / ||teacher||^2 over the batch (floored so zeros stay finite)."""
    scale = teacher.float().square().mean().clamp_min(1e-12)
    return F.mse_loss(student.float(), teacher.float()) / scale


def distillation_loss(
    student: Mapping[str, torch.Tensor],
    teacher: Mapping[str, torch.Tensor],
    kinds: Mapping[str, str],
    temperature: float,
    axes: Mapping[str, int] | None = None,
) -> torch.Tensor:
    """Sum of the per-output losses (outputs whose kind is "none" are left out); `axes`: the
    class axis of a label map's scores (its ArgMax's), 1 elsewhere."""
    total, axes = None, axes or {}
    for name, kind in kinds.items():
        if kind == "none":
            continue
        s, t = student[name], teacher[name]
        kl = kind == "kl"
        term = kd_kl(s, t, temperature, axes.get(name, 1)) if kl else normalised_mse(s, t)
        total = term if total is None else total + term
    assert total is not None  # choose_losses refuses all-"none"
    return total

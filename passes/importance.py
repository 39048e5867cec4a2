"""Which channels of a group to keep: importance scores and top-k choice.

An importance function scores every channel of a group; `choose_channels`
keeps the highest-scoring ones. The default scores a channel by the L1 norm of
the filters that produce it, summed over the group's producers (a residual
group has several). Any callable with the same signature can replace it, e.g.
one built from per-channel activation statistics measured with onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .channel_groups import FILTERS, ChannelGroup

Importance = Callable[[onnx.ModelProto, ChannelGroup], np.ndarray]


@dataclass
class _Weights:
    """Constants (initializers and Constant nodes) by name."""

    tensors: dict[str, onnx.TensorProto]

    @classmethod
    def of(cls, model: onnx.ModelProto) -> _Weights:
        tensors = {t.name: t for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute[0].name == "value":
                tensors[node.output[0]] = node.attribute[0].t
        return cls(tensors)

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.tensors[name]).astype(np.float64)


# While `choose_channels` runs, constants are looked up in one index instead of a scan
# per group (protobuf messages cannot be weakly referenced, so no lasting cache).
_current: tuple[onnx.ModelProto, _Weights] | None = None


@contextmanager
def _weights_of(model: onnx.ModelProto) -> Iterator[None]:
    global _current
    outer = _current
    _current = (model, _Weights.of(model))
    try:
        yield
    finally:
        _current = outer


def _weights(model: onnx.ModelProto) -> _Weights:
    if _current is not None and _current[0] is model:
        return _current[1]
    return _Weights.of(model)


def l1_importance(model: onnx.ModelProto, group: ChannelGroup) -> np.ndarray:
    """Per channel of `group`: the L1 norm of its producing filters, summed over producers.

    A channel's filters are the slices of each producer's weight along its output
    axis (all of a conv-group's filters for a grouped conv). Groups without
    producers (graph inputs) score zero everywhere.
    """
    weights = _weights(model)
    scores = np.zeros(group.size, dtype=np.float64)
    for member in group.members:
        if member.role != FILTERS:
            continue
        weight = np.abs(weights.array(member.tensor))
        per_channel = np.moveaxis(weight, member.axis, 0).reshape(weight.shape[member.axis], -1)
        scores += per_channel.sum(axis=1)[member.positions].sum(axis=1)
    return scores


def choose_channels(
    model: onnx.ModelProto,
    groups: Sequence[ChannelGroup],
    counts: Mapping[int, int],
    importance: Importance = l1_importance,
) -> dict[int, list[int]]:
    """For each group id in `counts`, the sorted indices of its `counts[id]` most important
    channels (ties go to the lower index, so the choice is deterministic)."""
    by_id = {g.id: g for g in groups}
    chosen: dict[int, list[int]] = {}
    with _weights_of(model):
        for gid, count in counts.items():
            group = by_id[gid]
            if not 1 <= count <= group.size:
                raise ValueError(f"group {gid}: cannot keep {count} of {group.size} channels")
            if count == group.size:
                chosen[gid] = list(range(group.size))
                continue
            scores = np.asarray(importance(model, group), dtype=np.float64)
            if scores.shape != (group.size,):
                raise ValueError(
                    f"importance for group {gid} has shape {scores.shape}, want ({group.size},)"
                )
            order = np.argsort(-scores, kind="stable")
            chosen[gid] = sorted(order[:count].tolist())
    return chosen

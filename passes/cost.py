"""Parameters and MACs as a function of channels kept per group, without building models.

Budget solving asks "how big is the model if group g keeps c_g channels?"
hundreds of times. Every weight's size is a product of its axes, and each
axis that follows channel groups keeps `fixed + sum_g width_g * c_g`
positions; so one pass over the slots builds a few arrays, and each query is
a bincount and a dot product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .analysis import ModelAnalysis, analyze_model
from .channel_groups import ChannelAnalysis, analyze_channels
from .channel_walk import FILTERS, WEIGHTS_IN
from .graph import GraphIndex, count_parameters, is_weight


@dataclass
class CostModel:
    sizes: np.ndarray  # channels per group before
    axis_fixed: np.ndarray  # per tracked axis: positions that belong to no group
    entry_axis: np.ndarray  # (axis, group, width) triples: axis keeps width * c_group
    entry_group: np.ndarray
    entry_width: np.ndarray
    base_params: int  # parameters that no plan changes
    base_macs: int
    param_terms: tuple[np.ndarray, np.ndarray, np.ndarray]  # coef * kept[a] * kept[b]
    mac_terms: tuple[np.ndarray, np.ndarray, np.ndarray]
    # Layer weight name -> tracked axis of its dims 0 and 1 (-1: the axis never changes).
    weight_axes: dict[str, tuple[int, int]] = field(default_factory=dict)
    # "params"/"macs" -> the terms one group moves on both axes (see with_steps)
    _moved_twice: dict[str, tuple] = field(default_factory=dict, repr=False, compare=False)

    def kept(self, counts: Mapping[int, int]) -> np.ndarray:
        """Positions each tracked axis keeps; the extra last entry (index -1) is 1."""
        c = self.sizes.astype(np.float64)
        if counts:  # planners ask thousands of times: no Python loop over the groups
            n = len(counts)
            c[np.fromiter(counts.keys(), np.int64, n)] = np.fromiter(counts.values(), np.float64, n)
        kept = self.axis_fixed + np.bincount(
            self.entry_axis, self.entry_width * c[self.entry_group], len(self.axis_fixed)
        )
        return np.append(kept, 1.0)  # axis index -1: "no tracked axis"

    def __call__(self, counts: Mapping[int, int]) -> tuple[int, int]:
        kept = self.kept(counts)

        def total(terms) -> float:
            coef, a, b = terms
            return float(np.dot(coef, kept[a] * kept[b]))

        return (
            int(round(self.base_params + total(self.param_terms))),
            int(round(self.base_macs + total(self.mac_terms))),
        )

    def with_steps(
        self, counts: Mapping[int, int], groups: Sequence[int], new: Sequence[int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """(params, MACs) of `counts` with group `groups[j]` keeping `new[j]` channels, each
        change alone: a planner's every next step in one query instead of one per step.

        A step of d channels in group g moves each axis of g by width * d, so each term
        coef * kept[a] * kept[b] changes by coef * (d_a * kept[b] + kept[a] * d_b + d_a * d_b):
        per group, a linear part in d and (for a weight one group moves on both axes,
        e.g. depthwise) a square part, summed once over the terms for all steps."""
        kept = self.kept(counts)
        ids = np.asarray(groups, dtype=np.int64)
        c = self.sizes.astype(np.float64)
        if counts:
            n = len(counts)
            c[np.fromiter(counts.keys(), np.int64, n)] = np.fromiter(counts.values(), np.float64, n)
        delta = np.asarray(new, dtype=np.float64) - c[ids]
        size, groups_n = len(kept), len(self.sizes)

        def total(base: int, terms, kind: str) -> np.ndarray:
            coef, a, b = terms
            a, b = a % size, b % size  # -1: the constant last entry
            slope = np.bincount(a, coef * kept[b], size) + np.bincount(b, coef * kept[a], size)
            linear = np.bincount(
                self.entry_group, self.entry_width * slope[self.entry_axis], groups_n
            )
            square = np.zeros(groups_n)
            if kind not in self._moved_twice:  # depends on the model only: found once
                self._moved_twice[kind] = self._find_moved_twice(a, b)
            term, group, widths = self._moved_twice[kind]
            np.add.at(square, group, coef[term] * widths)
            now = base + float(np.dot(coef, kept[a] * kept[b]))
            change = delta * linear[ids] + delta**2 * square[ids]
            return np.rint(now + change).astype(np.int64)

        return (
            total(self.base_params, self.param_terms, "params"),
            total(self.base_macs, self.mac_terms, "macs"),
        )

    def _find_moved_twice(
        self, a: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(term, group, width_a * width_b) for each term whose axes one group both moves."""
        width = {
            (axis, group): w
            for axis, group, w in zip(
                self.entry_axis.tolist(), self.entry_group.tolist(), self.entry_width.tolist()
            )
        }
        by_axis: dict[int, list[int]] = {}
        for axis, group in width:
            by_axis.setdefault(axis, []).append(group)
        found = [
            (t, g, width[(x, g)] * width[(y, g)])
            for t, (x, y) in enumerate(zip(a.tolist(), b.tolist()))
            for g in by_axis.get(x, ())
            if (y, g) in width
        ]
        term, group, widths = zip(*found) if found else ((), (), ())
        return np.array(term, np.int64), np.array(group, np.int64), np.array(widths)

    @classmethod
    def build(
        cls,
        model: onnx.ModelProto,
        channels: ChannelAnalysis | None = None,
        analysis: ModelAnalysis | None = None,
        index: GraphIndex | None = None,
    ) -> CostModel:
        """The cost model of `model`; the analyses and `GraphIndex.build(model)` are
        computed unless the caller has them."""
        index = GraphIndex.of(model, index)
        channels = channels or analyze_channels(model, index=index)
        analysis = analysis or analyze_model(model, index=index)
        sizes = np.array([g.size for g in channels.groups], dtype=np.int64)
        group_of = np.full(len(channels.root), -1, dtype=np.int64)
        for g, classes in enumerate(channels.classes):
            group_of[classes] = g

        # Tracked axes: (constant, axis) -> index, and the channel ids along each.
        axis_index: dict[tuple[str, int], int] = {}
        axis_ids: list[np.ndarray] = []
        for slot in channels.slots:
            name = index.nodes[slot.node].input[slot.input]
            source = index.source_initializer(name) or name
            key = (source, slot.axis)
            if key not in axis_index:
                axis_index[key] = len(axis_ids)
                axis_ids.append(slot.ids.ravel())
        # Per axis, positions in no group (fixed), and per group on it an entry (axis, group,
        # width): all axes at once, as a deep model has thousands.
        axes = len(axis_ids)
        groups = group_of[channels.root[np.concatenate(axis_ids)]] if axes else np.zeros(0, int)
        axis_of = np.repeat(np.arange(axes), [len(ids) for ids in axis_ids])
        fixed = np.bincount(axis_of[groups < 0], minlength=axes).astype(np.float64)
        span = max(len(sizes), 1)  # pair key: axis * span + group
        grouped = groups >= 0
        pairs, counts = np.unique(axis_of[grouped] * span + groups[grouped], return_counts=True)
        e_axis, e_group = pairs // span, pairs % span
        e_width = counts / sizes[e_group]

        def term(source: str | None, dims: tuple[int, ...], coef: float):
            """coef * size of `source`, as (coefficient, tracked axis a, tracked axis b)."""
            tracked = [
                axis_index[(source, k)] for k in range(len(dims)) if (source, k) in axis_index
            ]
            untracked = [d for k, d in enumerate(dims) if (source, k) not in axis_index]
            if len(tracked) > 2:
                raise ValueError(f"{source}: more than two channel axes")
            a, b = (tracked + [-1, -1])[:2]
            return coef * float(math.prod(untracked)), a, b

        statistics = {
            name
            for node in index.nodes
            if node.op_type == "BatchNormalization"
            for name in node.input[3:5]
        }
        base_params = count_parameters(model)
        param_terms = []
        tracked_sources = {s for s, _ in axis_index}
        for name, tensor in index.initializers.items():
            if name in tracked_sources and is_weight(tensor) and (name not in statistics):
                base_params -= math.prod(tensor.dims)
                param_terms.append(term(name, tuple(tensor.dims), 1.0))

        base_macs = analysis.total_macs
        mac_terms = []
        weights = {layer.name: (layer.weight, layer.macs) for layer in analysis.layers}
        computed = _computed_from(index, channels)
        weight_axes = {}
        for layer in analysis.layers:
            source = index.source_initializer(layer.weight)
            if source is None and layer.name in computed:  # the axes of the weight's size
                source, axes = computed[layer.name]
                weight_axes[layer.weight] = tuple(axis_index.get((source, a), -1) for a in axes)
                continue
            weight_axes[layer.weight] = tuple(axis_index.get((source, k), -1) for k in (0, 1))
        for node in index.nodes:
            if node.name in analysis.other_macs:
                weights[node.name] = (node.input[1], analysis.other_macs[node.name])
        for layer_name, (weight, macs) in weights.items():
            source = index.source_initializer(weight)
            if source is None and layer_name in computed:  # MACs scale as its initializer
                source = computed[layer_name][0]
            if source is None or source not in tracked_sources or macs == 0:
                continue
            dims = tuple(index.initializers[source].dims)
            base_macs -= macs
            mac_terms.append(term(source, dims, macs / float(math.prod(dims))))

        def arrays(terms):
            if not terms:
                return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
            coef, a, b = zip(*terms)
            return np.array(coef), np.array(a, np.int64), np.array(b, np.int64)

        return cls(
            sizes=sizes,
            axis_fixed=fixed,
            entry_axis=e_axis.astype(np.int64),
            entry_group=e_group.astype(np.int64),
            entry_width=e_width.astype(np.float64),
            base_params=base_params,
            base_macs=base_macs,
            param_terms=arrays(param_terms),
            mac_terms=arrays(mac_terms),
            weight_axes=weight_axes,
        )


def _computed_from(
    index: GraphIndex, channels: ChannelAnalysis
) -> dict[str, tuple[str, tuple[int, int]]]:
    """Convs whose weight is computed in the graph (`weight_chain.py`): conv name -> (the
    initializer of the weight's size it is computed from, its axes that count the conv's
    output and input channels, -1 where none does)."""
    found: dict[str, tuple[str, list[int]]] = {}
    for slot in channels.slots:
        if slot.owner is None or slot.role not in (FILTERS, WEIGHTS_IN):
            continue
        source = index.source_initializer(index.nodes[slot.node].input[slot.input])
        if source is None:
            continue
        conv = index.nodes[slot.owner]
        dims = index.initializers[source].dims
        weight = index.shapes.get(conv.input[1]) or ()
        entry = found.setdefault(conv.name, (source, [-1, -1]))
        k = 0 if slot.role == FILTERS else 1
        if entry[0] == source and len(weight) > k and dims[slot.axis] == weight[k]:
            entry[1][k] = slot.axis
    return {name: (source, (axes[0], axes[1])) for name, (source, axes) in found.items()}

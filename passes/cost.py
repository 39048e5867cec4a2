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
from .graph import GraphIndex
from .load import indexed
from .parameters import parameter_sizes


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
    # Constants whose readers cut them differently are written once per cut (see `build`):
    # per cut, its own tracked axes and terms; equal cuts (every axis whole) are one tensor.
    # (tracked axis, cut) pairs; per cut its constant; per constant its size.
    merge_axis: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    merge_cut: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    cut_constant: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    constant_size: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # "params"/"macs" -> the terms one group moves on both axes (see with_steps); "merge" ->
    # the widths of the groups on the merge axes
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

        merged = self._merged(self._whole(kept[self.merge_axis][:, None]))[0]
        return (
            int(round(self.base_params + total(self.param_terms) - merged)),
            int(round(self.base_macs + total(self.mac_terms))),
        )

    def _whole(self, kept: np.ndarray) -> np.ndarray:
        """Whether each of `merge_axis` keeps every position at `kept` (its positions, one
        column per plan)."""
        full = self.axis_fixed + np.bincount(
            self.entry_axis, self.entry_width * self.sizes[self.entry_group], len(self.axis_fixed)
        )
        return kept >= full[self.merge_axis][:, None] - 0.5

    def _merged(self, whole: np.ndarray) -> np.ndarray:
        """Per column of `whole` (merge axes x plans): the parameters the terms count twice,
        a constant's uncut copies being one tensor in the written model."""
        cuts, constants = len(self.cut_constant), len(self.constant_size)
        if not constants:
            return np.zeros(whole.shape[1])
        incidence = np.zeros((cuts, len(self.merge_axis)))
        incidence[self.merge_cut, np.arange(len(self.merge_axis))] = 1.0
        uncut = (incidence @ (~whole)) == 0  # cuts x plans: no axis of the cut loses any
        owner = np.zeros((constants, cuts))
        owner[self.cut_constant, np.arange(cuts)] = 1.0
        copies = owner @ uncut
        return self.constant_size @ np.maximum(copies - 1, 0)

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

        merged = np.zeros(len(ids))
        if len(self.constant_size):
            if "merge" not in self._moved_twice:  # per merge axis, each group's width on it
                width = np.zeros((len(self.merge_axis), groups_n))
                for row, axis in enumerate(self.merge_axis.tolist()):
                    on = self.entry_axis == axis
                    width[row, self.entry_group[on]] = self.entry_width[on]
                self._moved_twice["merge"] = (width,)
            (width,) = self._moved_twice["merge"]
            stepped = kept[self.merge_axis][:, None] + width[:, ids] * delta[None, :]
            merged = self._merged(self._whole(stepped))

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

        params = total(self.base_params, self.param_terms, "params")
        return (
            np.rint(params - merged).astype(np.int64),
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
        """The cost model of `model` (brought to `load_model` form, as the analyses bring
        it); the analyses and `GraphIndex.build(model)` are computed unless the caller has
        them, and `channels` of another model is refused."""
        model, index = indexed(model, index)
        if channels is None:
            channels = analyze_channels(model, index=index)
        else:
            channels.check_model(model)  # its slots index that model's nodes
        if analysis is None:
            analysis = analyze_model(model, index=index)
        else:
            analysis.check_model(model)
        sizes = np.array([g.size for g in channels.groups], dtype=np.int64)
        group_of = np.full(len(channels.root), -1, dtype=np.int64)
        for g, classes in enumerate(channels.classes):
            group_of[classes] = g

        # Tracked axes: (constant, cut, axis) -> index, and the channel ids along each. A
        # constant's readers that cut it differently get copies (shrink_channels), so each
        # distinct cut (the channel classes along each axis it cuts; none for a reader that
        # cuts nothing) is counted as a tensor of its own; cut 0 is the first reader's.
        per_use: dict[tuple[int, int], dict[int, np.ndarray]] = {}
        for slot in channels.slots:
            per_use.setdefault((slot.node, slot.input), {}).setdefault(slot.axis, slot.ids)
        source_of = {
            use: index.source_initializer(index.nodes[use[0]].input[use[1]])
            or index.nodes[use[0]].input[use[1]]
            for use in per_use
        }
        cuts: dict[str, dict[bytes, int]] = {}
        cut_of: dict[tuple[int, int], int] = {}
        axis_index: dict[tuple[str, int, int], int] = {}
        axis_ids: list[np.ndarray] = []
        for use, by_axis in per_use.items():
            source = source_of[use]
            key = b"|".join(
                b"%d:" % a + channels.root[by_axis[a].ravel()].tobytes() for a in sorted(by_axis)
            )
            known = cuts.setdefault(source, {})
            cut = cut_of[use] = known.setdefault(key, len(known))
            for a in sorted(by_axis):
                if (source, cut, a) not in axis_index:
                    axis_index[source, cut, a] = len(axis_ids)
                    axis_ids.append(by_axis[a].ravel())
        for source, uses in index.readers(cuts).items():  # those that cut nothing keep it whole
            if any(use not in cut_of for use in uses):
                cuts[source].setdefault(b"", len(cuts[source]))
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

        def term(source: str | None, dims: tuple[int, ...], coef: float, cut: int = 0):
            """coef * size of `source` as cut `cut` of it keeps it, as (coefficient, tracked
            axis a, tracked axis b)."""
            keys = [(source, cut, k) for k in range(len(dims))]
            tracked = [axis_index[key] for key in keys if key in axis_index]
            untracked = [d for key, d in zip(keys, dims) if key not in axis_index]
            if len(tracked) > 2:
                raise ValueError(f"{source}: more than two channel axes")
            a, b = (tracked + [-1, -1])[:2]
            return coef * float(math.prod(untracked)), a, b

        counted = parameter_sizes(model)
        base_params = sum(counted.values())
        param_terms = []
        tracked_sources = {s for s, _, _ in axis_index}
        merge_axis, merge_cut, cut_constant, constant_size = [], [], [], []
        for name, tensor in index.initializers.items():
            if name in tracked_sources and name in counted:
                base_params -= math.prod(tensor.dims)
                for cut in cuts[name].values():
                    param_terms.append(term(name, tuple(tensor.dims), 1.0, cut))
                if len(cuts[name]) < 2:
                    continue
                for cut in cuts[name].values():
                    for k in range(len(tensor.dims)):
                        if (name, cut, k) in axis_index:
                            merge_axis.append(axis_index[name, cut, k])
                            merge_cut.append(len(cut_constant))
                    cut_constant.append(len(constant_size))
                constant_size.append(float(math.prod(tensor.dims)))

        base_macs = analysis.total_macs
        mac_terms = []
        weights = {layer.name: (layer.weight, layer.macs) for layer in analysis.layers}
        computed = _computed_from(index, channels)
        weight_axes = {}
        number_of = {node.name: n for n, node in enumerate(index.nodes)}
        for layer in analysis.layers:
            source = index.source_initializer(layer.weight)
            cut = cut_of.get((number_of[layer.name], 1), 0)
            if source is None and layer.name in computed:  # the axes of the weight's size
                source, axes = computed[layer.name]
                weight_axes[layer.weight] = tuple(axis_index.get((source, 0, a), -1) for a in axes)
                continue
            weight_axes[layer.weight] = tuple(axis_index.get((source, cut, k), -1) for k in (0, 1))
        for node in index.nodes:
            if node.name in analysis.other_macs:
                weights[node.name] = (node.input[1], analysis.other_macs[node.name])
        for layer_name, (weight, macs) in weights.items():
            source = index.source_initializer(weight)
            cut = cut_of.get((number_of[layer_name], 1), 0)
            if source is None and layer_name in computed:  # MACs scale as its initializer
                source, cut = computed[layer_name][0], 0
            if source is None or source not in tracked_sources or macs == 0:
                continue
            dims = tuple(index.initializers[source].dims)
            base_macs -= macs
            mac_terms.append(term(source, dims, macs / float(math.prod(dims)), cut))

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
            merge_axis=np.array(merge_axis, np.int64),
            merge_cut=np.array(merge_cut, np.int64),
            cut_constant=np.array(cut_constant, np.int64),
            constant_size=np.array(constant_size, np.float64),
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

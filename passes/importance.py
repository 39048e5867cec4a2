"""Which channels of a group to keep: importance criteria and top-k choice.

A criterion is an object built once per model (it reads the model's weights
once, on demand) that scores every channel of a channel group. Each of the
group's producers (a residual group has several) scores its own channels, and
the scores are normalised per producer (divided by their mean) before they are
summed: producers whose outputs BatchNorm rescales have filter norms on
unrelated scales, and without the normalisation the largest one decides alone.

Criteria (`CRITERIA`, `--importance`):
  l1   the L1 norm of a channel's filters
  l2   their L2 norm
  bn   the L2 norm of the filter with the BatchNorm that follows it folded in
       (|gamma| / sqrt(var + eps) times the filter norm): what the channel
       contributes after normalisation (a Conv's, a ConvTranspose's, grouped too, or a
       Gemm's with a 1-D BatchNorm); plain l2 where no BatchNorm alone reads the output
  act  the mean |activation| the channel produces (`ActivationImportance`,
       built from statistics measured with onnxruntime)
A conv whose weight the graph computes (weight standardisation) is scored by the filters
it computes, not by the initializer they are computed from.
l1, l2 and bn read no bias or BatchNorm beta: a channel with zero filters (or gamma) scores 0
and is cut first, though with a non-zero bias/beta it outputs a constant (relu(b)) that the
next layer reads; act measures that constant.
On the bundled model (`bench/importance.py`: relative output error after
removing 25% of each residual group) act ranks best, then l2; l1 and bn rank no
better than random. `reduce` uses act when it has data and `DEFAULT_CRITERION`
(l2) otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx

from .channel_groups import ChannelGroup, Member
from .channel_walk import ACTIVATION, FILTERS, constant_source
from .domains import op_id, opset_ids, opset_versions
from .errors import BadInputError
from .graph import GraphIndex, attributes

DEFAULT_CRITERION = "l2"  # the best weight-only criterion in bench/importance.py
ROW_BLOCK = 1 << 15  # weight entries FilterNorm converts to float64 at a time (256 KB)


class Importance:
    """Scores the channels of a group of one model; subclasses score one producer."""

    name = "importance"

    def __init__(self, model: onnx.ModelProto, index: GraphIndex | None = None) -> None:
        self.index = GraphIndex.of(model, index)  # the caller's GraphIndex.build(model), if any
        # conv weights the graph computes, by name (None: computed from a model input)
        self._computed: dict[str, np.ndarray | None] = {}
        self._opsets = opset_versions(model)

    def weight(self, name: str) -> np.ndarray:
        """A constant of the model, in its own type (each producer reads its own once)."""
        value = self._computed.get(name)
        value = self.index.constant(name) if value is None else value
        if value is None:
            raise ValueError(f"{name!r} is not a constant of the model this criterion read")
        return value

    @functools.cached_property
    def nodes(self) -> dict[str, onnx.NodeProto]:
        """The model's nodes by name (producers are named by node)."""
        return {n.name: n for n in self.index.nodes}

    def computed_filters(self, member: Member, group: ChannelGroup) -> Member:
        """`member`, or for a Conv whose weight the graph computes (weight standardisation,
        NFNet), its weight as computed on its output channels: the initializer it is computed
        from has other norms (a row of any scale standardises alike; a zero gain zeroes it)."""
        node = self.nodes.get(member.node)
        if node is None or op_id(node) != "Conv" or constant_source(self.index, node.input[1]):
            return member
        out = next(
            (m for m in group.members if m.tensor == node.output[0] and m.role == ACTIVATION),
            None,
        )
        if out is None or out.axis != 1:
            return member
        if node.input[1] not in self._computed:
            self._computed[node.input[1]] = computed_value(self.index, node.input[1], self._opsets)
        if self._computed[node.input[1]] is None:  # no value before the model runs
            return member
        return Member(node.input[1], 0, out.positions, FILTERS, node.name)

    def producer_scores(self, member: Member) -> np.ndarray | None:
        """Per group channel, the score `member` (a FILTERS member) gives it; None if
        this criterion cannot score that producer."""
        raise NotImplementedError

    def __call__(self, group: ChannelGroup) -> np.ndarray:
        """Per channel of `group`: the sum over its producers of their normalised scores.
        Groups without producers (graph inputs) score zero everywhere."""
        total = np.zeros(group.size, dtype=np.float64)
        for member in group.members:
            if member.role != FILTERS:
                continue
            scores = self.producer_scores(self.computed_filters(member, group))
            if scores is None:
                continue
            if not np.isfinite(scores).all():  # NaN ranks at random, inf divides to NaN
                raise BadInputError(
                    f"{self.name} importance cannot rank the channels of {member.node!r}: its "
                    f"weights ({member.tensor!r}, or what scales them) hold NaN or inf"
                )
            mean = float(scores.mean())
            total += scores / mean if mean > 0 else scores
        return total

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class FilterNorm(Importance):
    """The Lp norm (p = 1 or 2) of the filters that produce a channel (all of a
    conv-group's filters for a grouped conv)."""

    def __init__(self, model: onnx.ModelProto, p: int = 1, index: GraphIndex | None = None) -> None:
        if p not in (1, 2):
            raise ValueError(f"FilterNorm: p must be 1 or 2, not {p}")
        super().__init__(model, index)
        self.p = p
        self.name = f"l{p}"

    def producer_scores(self, member: Member) -> np.ndarray:
        per_channel = self.row_power(member)[member.positions].sum(axis=1)
        return per_channel if self.p == 1 else np.sqrt(per_channel)

    def row_power(self, member: Member) -> np.ndarray:
        """Per entry of the producer's output axis: sum |w| (p=1) or sum w^2 (p=2), in
        float64. A block of rows at a time: each row's sum is the one over all rows at
        once, bit for bit, without float64 copies of the whole weight (4x faster on
        ResNet-50, issue 23)."""
        weight = self.weight(member.tensor)
        rows = np.moveaxis(weight, member.axis, 0).reshape(weight.shape[member.axis], -1)
        power = np.abs if self.p == 1 else np.square
        out = np.empty(len(rows), dtype=np.float64)
        step = max(1, ROW_BLOCK // max(1, rows.shape[1]))
        for start in range(0, len(rows), step):
            block = rows[start : start + step].astype(np.float64)
            out[start : start + step] = power(block).sum(axis=1)
        return out

    def __repr__(self) -> str:
        return f"FilterNorm(p={self.p})"


class BatchNormScaled(FilterNorm):
    """The L2 norm of a producer's filter with the BatchNormalization that reads its
    output folded in (each filter times |gamma| / sqrt(var + eps)), if one does."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex | None = None) -> None:
        super().__init__(model, p=2, index=index)
        self.name = "bn"

    def row_power(self, member: Member) -> np.ndarray:
        scale = self._bn_scale(member.node)
        node = self.nodes.get(member.node)
        if scale is not None and op_id(node) == "ConvTranspose" and member.axis == 0:
            return self._grouped_transpose_power(member, node, scale)
        power = super().row_power(member)
        return power if scale is None or scale.shape != power.shape else power * scale**2

    def _grouped_transpose_power(
        self, member: Member, node: onnx.NodeProto, scale: np.ndarray
    ) -> np.ndarray:
        """A grouped ConvTranspose's rows are input channels (C_in, C_out / group, ...), each
        reaching its conv-group's output channels: every entry times its output channel's
        scale, the folded filter's squared norm row by row."""
        weight = self.weight(member.tensor)
        group, per = int(attributes(node).get("group", 1)), weight.shape[1]
        if scale.shape != (group * per,) or weight.shape[0] % group:
            return super().row_power(member)
        square = np.square(weight.astype(np.float64)).reshape(len(weight), per, -1).sum(axis=2)
        rows_group = np.arange(len(weight)) // (len(weight) // group)
        return (square * (scale**2).reshape(group, per)[rows_group]).sum(axis=1)

    def _bn_scale(self, producer: str) -> np.ndarray | None:
        node = self.nodes.get(producer)
        if node is None or op_id(node) not in ("Conv", "ConvTranspose", "Gemm"):
            return None
        weight = self.index.initializers.get(node.input[1]) if len(node.input) > 1 else None
        made = None if weight is None else weight.data_type  # the conv's output type
        readers = self.index.consumers.get(node.output[0], [])
        while len(readers) == 1 and self._passes_on(readers[0], made):
            readers = self.index.consumers.get(readers[0].output[0], [])
        if len(readers) != 1 or op_id(readers[0]) != "BatchNormalization":
            return None
        bn = readers[0]
        gamma, var = (self.index.constant(bn.input[i]) for i in (1, 4))
        if gamma is None or var is None:
            return None
        eps = float(attributes(bn).get("epsilon", 1e-5))
        return np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)

    def _passes_on(self, node: onnx.NodeProto, made: int | None) -> bool:
        """An op that hands its input on unchanged: an Identity, a Cast to the type the conv
        makes (`made`), or a Dropout not training (no `training_mode`, or a constant false
        one), as exporters leave between a conv and its BatchNorm; or one that only shifts
        it: an Add or Sub of a constant (a conv's bias written apart, as Paddle2ONNX does),
        which leaves the scale the BatchNorm folds in as it was."""
        if op_id(node) == "Identity":
            return True
        if op_id(node) in ("Add", "Sub") and len(node.input) == 2:
            return sum(self.index.constant(x) is None for x in node.input) == 1
        if op_id(node) == "Cast":
            return made is not None and attributes(node).get("to") == made
        if op_id(node) != "Dropout":
            return False
        training = self.index.constant(node.input[2]) if len(node.input) > 2 else None
        return (
            len(node.input) < 3
            or not node.input[2]
            or (training is not None and not training.any())
        )

    def __repr__(self) -> str:
        return "BatchNormScaled()"


class ActivationImportance(Importance):
    """The mean |activation| a channel produces, read at each producer's first
    activation; `per_layer` maps a producer node name to its per-channel means.
    Producers without statistics are scored by `fallback` (default: filter L1)."""

    name = "act"

    def __init__(
        self,
        model: onnx.ModelProto,
        per_layer: Mapping[str, np.ndarray],
        fallback: Importance | None = None,
        index: GraphIndex | None = None,
    ) -> None:
        super().__init__(model, index)
        self.per_layer = {k: np.asarray(v, dtype=np.float64) for k, v in per_layer.items()}
        self.fallback = fallback or FilterNorm(model, p=1, index=self.index)

    def producer_scores(self, member: Member) -> np.ndarray | None:
        if member.node in self.per_layer:
            return self.per_layer[member.node][self._outputs(member)].sum(axis=1)
        return self.fallback.producer_scores(member)

    def _outputs(self, member: Member) -> np.ndarray:
        """Where the producer's output channels of each group channel sit: its filter
        positions, except for a grouped ConvTranspose, whose filters are cut on the weight's
        input axis (C_in, C_out / group, ...): conv-group j makes outputs j * C_out / group
        on, whichever of its input channels the positions hold."""
        node = self.nodes.get(member.node)
        if node is None or op_id(node) != "ConvTranspose" or member.axis != 0:
            return member.positions
        group = int(attributes(node).get("group", 1))
        shape = self.index.shapes.get(node.input[1])
        if group == 1 or not shape:
            return member.positions
        per_in, per_out = shape[0] // group, shape[1]
        conv_groups = member.positions[:, :1] // per_in
        return conv_groups * per_out + np.arange(per_out)

    def __repr__(self) -> str:
        return f"ActivationImportance({len(self.per_layer)} layers)"


def computed_value(index: GraphIndex, name: str, opsets: Mapping[str, int]) -> np.ndarray | None:
    """The value of a tensor computed from constants alone (a conv's standardised weight),
    by onnx's reference evaluator over the nodes it is computed by; None where a model input
    is among what it is computed from (a weight scaled by an input has no value yet)."""
    from onnx.reference import ReferenceEvaluator

    needed, nodes, todo = set(), [], [name]
    while todo:
        tensor = todo.pop()
        node = index.producer.get(tensor)
        if tensor in needed:
            continue
        if node is None and tensor not in index.initializers:
            return None
        needed.add(tensor)
        if node is not None:
            nodes.append(node)
            todo.extend(i for i in node.input if i)
    order = {id(n): k for k, n in enumerate(index.nodes)}
    nodes = sorted({id(n): n for n in nodes}.values(), key=lambda n: order[id(n)])
    graph = onnx.helper.make_graph(
        nodes,
        "computed",
        [],
        [onnx.helper.make_tensor_value_info(name, 0, None)],
        [t for n, t in index.initializers.items() if n in needed],
    )
    model = onnx.helper.make_model(graph, opset_imports=opset_ids(opsets))
    return np.asarray(ReferenceEvaluator(model).run(None, {})[0])


# A criterion by name: a factory building it for a model (and its GraphIndex, if any).
ImportanceFactory = Callable[[onnx.ModelProto, "GraphIndex | None"], Importance]
CRITERIA: dict[str, ImportanceFactory] = {
    "l1": lambda model, index=None: FilterNorm(model, p=1, index=index),
    "l2": lambda model, index=None: FilterNorm(model, p=2, index=index),
    "bn": BatchNormScaled,
}
BUILT_IN = frozenset(CRITERIA)
RESERVED = ("act", "auto")  # reduce's names for activation importance and its default


def register_importance(name: str, factory: ImportanceFactory) -> None:
    """Make `name` a criterion `weight_importance` and `reduce(importance=name)` accept:
    `factory(model, index)` builds it for a model. Replaces an earlier registration."""
    if name in RESERVED or name in BUILT_IN:
        raise ValueError(f"{name!r} is a built-in importance name; choose another")
    if not callable(factory):
        raise TypeError(f"importance factory for {name!r} must be callable")
    CRITERIA[name] = factory


def unregister_importance(name: str) -> None:
    """Remove a criterion `register_importance` added."""
    if name in BUILT_IN or name not in CRITERIA:
        raise KeyError(f"no registered importance {name!r}")
    del CRITERIA[name]


def weight_importance(
    model: onnx.ModelProto, name: str = DEFAULT_CRITERION, index: GraphIndex | None = None
) -> Importance:
    """The weight-only criterion `name` (see CRITERIA) built for `model` (`index`: its
    GraphIndex, if the caller has one)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown importance {name!r}: use one of {', '.join(CRITERIA)}")
    return CRITERIA[name](model, index)


def group_scores(
    groups: Sequence[ChannelGroup], importance: Callable[[ChannelGroup], np.ndarray]
) -> dict[int, np.ndarray]:
    """Per group id, `importance`'s score of each of its channels, checked: computed once
    per model, for the planner (the global strategy ranks them) and for `choose_channels`."""
    scores: dict[int, np.ndarray] = {}
    for group in groups:
        values = np.asarray(importance(group), dtype=np.float64)
        if values.shape != (group.size,):
            raise ValueError(
                f"importance for group {group.id} has shape {values.shape}, want ({group.size},)"
            )
        if not np.all(np.isfinite(values)):
            raise ValueError(f"importance for group {group.id} is not finite")
        scores[group.id] = values
    return scores


def check_built_for(
    importance: Importance, index: GraphIndex, groups: Sequence[ChannelGroup]
) -> None:
    """Refuse an Importance object built for another model than `index`'s: it scores by the
    weights it read, so one of another checkpoint (the same names, other weights) would rank
    this model's channels by those without a word. Every producer weight of `groups` must be
    the one it holds (built on the model as read or its `load_model` form, both pass)."""
    theirs = getattr(importance, "index", None)
    if not isinstance(theirs, GraphIndex):
        return  # it scores by something other than a model's weights
    weights = (m.tensor for g in groups for m in g.members if m.role == FILTERS)
    for name in dict.fromkeys(weights):
        ours = index.initializers.get(name)
        if ours is not None and theirs.initializers.get(name) != ours:
            raise BadInputError(
                f"the importance {importance!r} was built for another model: its weight "
                f"{name!r} is not this model's; build it on load_model of the model reduced, "
                "or give its factory or name"
            )


def choose_channels(
    groups: Sequence[ChannelGroup],
    counts: Mapping[int, int],
    importance: Callable[[ChannelGroup], np.ndarray] | Mapping[int, np.ndarray],
) -> dict[int, list[int]]:
    """For each group id in `counts`, the sorted indices of its `counts[id]` most important
    channels (ties go to the lower index, so the choice is deterministic). `importance`
    is a criterion or the scores `group_scores` computed with one."""
    by_id = {g.id: g for g in groups}
    chosen: dict[int, list[int]] = {}
    for gid, count in counts.items():
        group = by_id[gid]
        if not 1 <= count <= group.size:
            raise ValueError(f"group {gid}: cannot keep {count} of {group.size} channels")
        if count == group.size:
            chosen[gid] = list(range(group.size))
            continue
        if isinstance(importance, Mapping):
            scores = importance[gid]
        else:
            scores = group_scores([group], importance)[gid]
        order = np.argsort(-scores, kind="stable")
        chosen[gid] = sorted(order[:count].tolist())
    return chosen

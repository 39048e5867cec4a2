"""MBS width planning: numbers in, widths out.

Per macroblock m: effective flops E(m) = sum MACs_k * rho_k, E_B(m) over its
base, redundancy R(m) = 1 - E_B(m)/E(m), width scale beta(m) =
clip(s * f(R(m)), beta_min, 1), where the width map f is linear, 1 - c * R
(the default: the paper's headline reductions are fitted best by it, see
bench/paper_table.py), or power, (1 - R) ** gamma. A channel group takes the
largest beta of the macroblocks where its channels are made; pinned groups keep every channel.
With a budget, the map's parameter (c or gamma) is solved by bisection in
[0, its maximum] so the reduced model keeps at most the asked fraction of
parameters, MACs and/or predicted latency (every limit given is met: the
largest excess over its fraction is solved to 0). Macroblocks without
redundancy never shrink through the parameter, so when it alone cannot reach
the budget, it stays at its maximum and the common scale s takes the rest.
Uniform scaling is the same formula with the parameter 0 (f = 1). The counts
are then nudged one channel-multiple at a time toward the budget, since
rounding to multiples of 8 makes the size a step function.

The `global` strategy has no macroblock structure: it is the policy of
importance-based pruners (Torch-Pruning's global pruning), see `_global_ranking`.

The `mbs-cost` strategy prices channels: MBS says what a channel is worth,
the budget's metric what it costs, and one ranking of worth per unit of cost
cuts the cheapest worth first (see `_cost_aware` and docs/strategies.md). Of a combined
budget, the metric of the limit that binds prices, or a bisected mix of two where both
bind (`_weigh_limits`).
`mbs-branch` is the same ranking with the joined groups (residual streams) last:
the ranking alone is indifferent between a stream and the branches on it.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from onnx_mbs.passes import BadInputError, ChannelGroup, ModelAnalysis, option

GAMMA_MAX = 2.0  # beyond this, budgets are met with a common scale (see plan_widths)
C_MAX = 1.0  # beta = 1 - R: past it, beta would turn negative where R is near 1
# The default reading and width map: the setting whose planned reductions land closest
# to the paper's four headlines (bench/paper_table.py, bench/results/paper_table.json).
DEFAULT_WIDTH_MAP = "linear:0.4"
# mbs-cost's f in its worth, tuned on a validation split (docs/strategies.md): at flops=0.5 on
# ResNet-20, c = 0 kept the most validation top-1 after retraining of c = 0, 0.2, 0.4 (90.54,
# 90.22, 89.58): weighting a channel down by its macroblock's redundancy cost accuracy at
# equal MACs. Its worth still follows MBS's effective flops (rho) and the importance.
COST_WIDTH_MAP = "linear:0"


def default_width_map(strategy: str) -> str:
    """The width map a strategy uses when none is asked for."""
    return COST_WIDTH_MAP if strategy in COST_AWARE else DEFAULT_WIDTH_MAP


Cost = Callable[[Mapping[int, int]], tuple[int, int]]  # group counts -> (params, MACs)


METRICS = ("params", "flops", "latency")
STRATEGIES = ("mbs", "mbs-cost", "mbs-branch", "uniform", "global")
COST_AWARE = ("mbs-cost", "mbs-branch")  # the strategies that price channels
PRICE_ROUNDS = 3  # mbs-cost: prices re-read at the plan they give, until the counts settle
PRICE_STEPS = 8  # mbs-cost under latency: prices read on 8 grid steps per group
MIX_STEPS = 8  # mbs-cost, combined budget: bisections of the weight between two limits' prices
BINDS_WITHIN = 0.01  # a limit binds when it is this close to its fraction as the closest one
Latency = Callable[[Mapping[int, int]], float]  # group counts -> predicted seconds
# What a free group of size 1 is, in the words its refusals use.
SINGLE_UNIT = (
    "its channels are kept or cut together, e.g. conv-groups that a channel shuffle mixes, "
    "and a group keeps at least one unit"
)


@dataclass(frozen=True)
class Budget:
    """Fractions of the original to keep, every one of them met: params=0.5,flops=0.6."""

    limits: tuple[tuple[str, float], ...]  # (metric, fraction), metrics in METRICS, each once

    def __post_init__(self) -> None:
        """Every Budget is checked, parsed or built by hand (`onnx_mbs.Budget`)."""
        if problem := self.problem(self.limits):
            spec = ",".join(f"{m}={f}" for m, f in self.limits)
            raise BadInputError(f"bad {option('--budget')} {spec!r}: {problem}")

    @staticmethod
    def problem(limits: Sequence[tuple[str, float | None]]) -> str:
        """What is wrong with these limits, or "" when they make a budget."""
        metrics = [m for m, _ in limits]
        if not metrics or any(m not in METRICS or f is None for m, f in limits):
            return (
                "use params=F, flops=F or latency=F (combine with commas, e.g. "
                "params=0.5,flops=0.6)"
            )
        if twice := next((m for m in metrics if metrics.count(m) > 1), None):
            return f"{twice} is given twice"
        if any(not isinstance(f, numbers.Real) or not 0 < f <= 1 for _, f in limits):
            return "the fraction must be in (0, 1]"
        return ""

    @classmethod
    def parse(cls, spec: str) -> Budget:
        limits: list[tuple[str, float | None]] = []
        for term in spec.split(","):
            metric, _, value = term.strip().partition("=")
            if metric in METRICS and value:
                try:
                    limits.append((metric, float(value)))
                except ValueError:
                    raise BadInputError(
                        f"bad {option('--budget')} {spec!r}: {value!r} is not a number"
                    ) from None
            else:
                limits.append((metric, None))
        if problem := cls.problem(limits):
            raise BadInputError(f"bad {option('--budget')} {spec!r}: {problem}")
        return cls(tuple(limits))

    @property
    def fractions(self) -> dict[str, float]:
        return dict(self.limits)

    def with_fraction(self, metric: str, fraction: float) -> Budget:
        """The same budget with one metric's fraction replaced."""
        return Budget(tuple((m, fraction if m == metric else f) for m, f in self.limits))

    def __str__(self) -> str:
        return ",".join(f"{m}={f:g}" for m, f in self.limits)


@dataclass(frozen=True)
class WidthMap:
    """f in beta(m) = clip(s * f(R(m)), beta_min, 1): `linear` 1 - c*R or `power` (1 - R)**gamma.

    Both give f = 1 at parameter 0 (uniform scaling) and shrink redundant
    macroblocks more as the parameter grows, so one bisection serves both.
    """

    kind: str  # "linear" or "power"
    value: float  # c or gamma

    KINDS = {"linear": ("c", C_MAX), "power": ("gamma", GAMMA_MAX)}

    @classmethod
    def parse(cls, spec: str | WidthMap) -> WidthMap:
        if isinstance(spec, WidthMap):
            return spec.check()
        # not text (a bare 0.4): refused below as an unknown kind
        kind, _, value = spec.partition(":") if isinstance(spec, str) else ("", "", "")
        if kind not in cls.KINDS or not value:
            raise BadInputError(
                f"bad {option('--width-map')} {spec!r}: use linear:C or power:GAMMA, "
                f"e.g. {DEFAULT_WIDTH_MAP}"
            )
        try:
            number = float(value)
        except ValueError:
            raise BadInputError(
                f"bad {option('--width-map')} {spec!r}: {value!r} is not a number"
            ) from None
        return cls(kind, number).check()

    def check(self) -> WidthMap:
        if self.kind not in self.KINDS:
            raise BadInputError(f"unknown width map {self.kind!r}: use linear or power")
        if not 0 <= self.value <= self.maximum:
            raise BadInputError(
                f"{option('--width-map')} {self}: {self.knob} must be in [0, {self.maximum:g}]"
            )
        return self

    @property
    def knob(self) -> str:
        return self.KINDS[self.kind][0]

    @property
    def maximum(self) -> float:
        return self.KINDS[self.kind][1]

    def with_value(self, value: float) -> WidthMap:
        return WidthMap(self.kind, value)

    def __call__(self, redundancy: float) -> float:
        if self.kind == "linear":
            return 1.0 - self.value * redundancy
        return (1.0 - redundancy) ** self.value

    def formula(self) -> str:
        f = "1 - c * R(m)" if self.kind == "linear" else "(1 - R(m)) ** gamma"
        return f"beta(m) = clip(scale * ({f}), beta_min, 1); R(m) = 1 - E_B(m) / E(m)"

    def __str__(self) -> str:
        return f"{self.kind}:{self.value:g}"


@dataclass(frozen=True)
class GroupInfo:
    """What planning needs to know about a channel group."""

    id: int
    size: int
    macroblocks: tuple[int, ...]
    pinned: bool
    joined: bool = False  # a residual stream (ChannelGroup.joined)
    unit: int = 1  # channels one of its units holds (ChannelGroup.unit); sizes count units
    # channels a unit holds on its narrowest layer axis (ChannelGroup.narrowest); None: `unit`
    narrowest: int | None = None

    @classmethod
    def of(cls, group: ChannelGroup) -> GroupInfo:
        return cls(
            group.id, group.size, tuple(group.macroblocks), group.pinned, group.joined,
            group.unit, group.narrowest,
        )  # fmt: skip

    def multiple(self, channels: int) -> int:
        """The units its count is a multiple of, so that its channels are a multiple of
        `channels` (the channel multiple): channels / gcd(channels, unit). A GroupNorm(32)
        unit (32 channels) is one step at multiple 8; counted in units, 8 of them were, and
        a GroupNorm(32, 256) could not be cut at all. The width is the narrowest a layer
        makes or reads a unit in (`narrowest`), not the widest (`unit`): after a pixel
        shuffle a unit is b * b of its producer's channels but one of the next conv's, so
        8 units at multiple 8 (by the producer's channels, 2 were, and the next conv read
        2, 4, 6 ... channels); a depthwise conv with multiplier 2 makes 2 channels of each
        of its input's 1."""
        width = self.unit if self.narrowest is None else self.narrowest
        return channels // math.gcd(channels, width)

    @property
    def free(self) -> bool:
        """Planning may narrow it: not pinned, and made in some macroblock."""
        return not self.pinned and bool(self.macroblocks)


@dataclass(frozen=True)
class MacroblockPlan:
    index: int
    resolution: tuple[int, int]
    effective_flops: float
    base_effective_flops: float
    redundancy: float
    beta: float | None  # None under `global`: no width scale decides its counts
    kept: float  # channels kept / before, over the groups whose channels m makes


@dataclass(frozen=True)
class Plan:
    strategy: str
    width_map: WidthMap | None  # the parameter actually used (under mbs-cost: the worth's
    # map as given); None under `global`
    receptive_field: str  # the reading the macroblock bases followed
    beta_min: float
    channel_multiple: int
    macroblocks: list[MacroblockPlan]
    counts: dict[int, int]  # group id -> channels kept
    sizes: dict[int, int]  # group id -> channels before
    params: tuple[int, int]  # before, after
    macs: tuple[int, int]
    budget: Budget | None = None
    scale: float = 1.0
    latency: tuple[float, float] | None = None  # seconds before, after, as measured
    notes: list[str] = field(default_factory=list)
    threshold: float | None = None  # `global`: normalised importance of the last channel cut;
    # `mbs-cost`: the multiplier lambda, worth per unit of cost of the last channel cut
    # `mbs-cost`: each metric a channel's price weighs -> its weight (the weights sum to 1)
    prices: dict[str, float] = field(default_factory=dict)
    strategy_reason: str = ""  # why this strategy ran (asked, or what `auto` chose and why)

    @property
    def formula(self) -> str:
        """The formula with the numbers used, e.g. for the report."""
        if self.strategy in COST_AWARE:
            return cost_aware_formula(self)
        if self.width_map is None:
            cut = "nothing" if self.threshold is None else f"every channel <= {self.threshold:.4g}"
            return (
                "global ranking: per channel group, importance / the group's mean importance; "
                f"one ranking over every free group; {cut} cut, then each group's count "
                f"rounded up to a multiple of {self.channel_multiple}, never below "
                f"beta_min = {self.beta_min:g} of the group"
            )
        return (
            f"{self.width_map.formula()} with {self.width_map.knob} = {self.width_map.value:.4g}, "
            f"scale = {self.scale:.4g}, beta_min = {self.beta_min:g}; base B(m): "
            + BASE_RULES[self.receptive_field]
        )

    @property
    def reached(self) -> dict[str, float]:
        reached = {
            "params": self.params[1] / self.params[0] if self.params[0] else 1.0,
            "flops": self.macs[1] / self.macs[0] if self.macs[0] else 1.0,
        }
        if self.latency is not None:
            reached["latency"] = self.latency[1] / self.latency[0]
        return reached

    @property
    def binding(self) -> tuple[str, ...]:
        """The budget's limits that bind: those as close to their fraction as the closest one
        (within BINDS_WITHIN); the others keep room below theirs."""
        if self.budget is None:
            return ()
        reached = self.reached
        room = {m: f - reached[m] for m, f in self.budget.limits if m in reached}
        least = min(room.values(), default=0.0)
        return tuple(m for m, r in room.items() if r <= least + BINDS_WITHIN)

    @property
    def priced(self) -> tuple[str, ...]:
        """The metrics a channel's price weighs (`mbs-cost`), in the budget's order."""
        return tuple(self.prices)

    @property
    def price_weights(self) -> tuple[float, ...]:
        """Each priced metric's weight, in `priced`'s order."""
        return tuple(self.prices.values())

    @property
    def price_text(self) -> str:
        """What a channel's price weighs: "params", or "0.62 params + 0.38 flops"."""
        if len(self.prices) < 2:
            return "".join(self.prices)
        return " + ".join(f"{w:.3g} {m}" for m, w in self.prices.items())

    @property
    def missed(self) -> list[str]:
        """The budget's metrics the written model is over: only a measured latency can be (the
        pipeline keeps the closest plan within it, else the closest of those it tried, when
        none is); params and MACs are met or refused."""
        if self.budget is None:
            return []
        reached = self.reached
        return [m for m, f in self.budget.limits if m in reached and reached[m] > f + 1e-12]

    @property
    def changes_anything(self) -> bool:
        return any(self.counts[g] < self.sizes[g] for g in self.counts)

    def knobs(self) -> dict[str, float | str | None]:
        """What decided the counts: the width map's parameter and scale, or the global cut."""
        if self.width_map is None:
            return {"mapping": None, "threshold": self.threshold}
        fmap = self.width_map
        if self.strategy in COST_AWARE:
            return {"mapping": fmap.kind, fmap.knob: fmap.value, "multiplier": self.threshold}
        return {"mapping": fmap.kind, fmap.knob: fmap.value, "scale": self.scale}

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "strategy_reason": self.strategy_reason,
            "receptive_field": self.receptive_field,
            **self.knobs(),
            "beta_min": self.beta_min,
            "channel_multiple": self.channel_multiple,
            "formula": self.formula,
            "macroblocks": [asdict(m) for m in self.macroblocks],
            "groups": [
                {"id": g, "before": self.sizes[g], "after": self.counts[g]} for g in self.sizes
            ],
            "params": {"before": self.params[0], "after": self.params[1]},
            "macs": {"before": self.macs[0], "after": self.macs[1]},
            **(
                {}
                if self.latency is None
                else {"latency_s": {"before": self.latency[0], "after": self.latency[1]}}
            ),
            "budget": None if self.budget is None else self.budget.fractions,
            "reached": self.reached,
            "binding": list(self.binding),
            "notes": self.notes,
        }


BASE_RULES = {
    "global": "m's layers whose receptive field in input pixels is at most the input image "
    "size, and m's first layers (those no other layer of m feeds)",
    "local": "m's layers whose receptive field in m's own pixels is at most max(H_m, W_m), "
    "and m's first layers (those no other layer of m feeds)",
}


def macroblock_redundancy(
    analysis: ModelAnalysis, rho: Mapping[str, float]
) -> list[tuple[float, float, float]]:
    """(E, E_B, R) per macroblock; rho defaults to 1 for layers without a measured activation."""
    result = []
    macs = {layer.name: layer.macs for layer in analysis.layers}  # names are unique
    for block in analysis.macroblocks:
        base = set(block.base_layers)
        total = base_total = 0.0
        for name in block.layers:
            ratio = rho.get(name, 1.0)
            if not math.isfinite(ratio):  # NaN would read as no redundancy (max(0, nan) is 0)
                raise BadInputError(f"the activation ratio (rho) of layer {name!r} is {ratio}")
            effective = macs[name] * ratio
            total += effective
            if name in base:
                base_total += effective
        redundancy = 1.0 - base_total / total if total > 0 else 0.0
        result.append((total, base_total, max(0.0, redundancy)))
    return result


def round_channels(size: int, fraction: float, multiple: int) -> int:
    """Channels kept for a group: `size * fraction` rounded up to a multiple of `multiple`
    (never down: at fraction 1 a group of 58 keeps 58), never below min(multiple, size).
    Only a budget's nudge rounds down, a multiple at a time, and never below this count at
    beta_min (`_nudge`)."""
    floor = min(multiple, size)
    wanted = max(floor, math.ceil(size * fraction / multiple - 1e-9) * multiple)
    return min(size, wanted)


def _counts(groups: Sequence[GroupInfo], betas: Sequence[float], multiple: int) -> dict[int, int]:
    counts = {}
    rounded: dict[tuple, int] = {}  # (size, step, macroblocks) -> count: most groups share a few
    for g in groups:
        if not g.free:
            counts[g.id] = g.size
            continue
        key = (g.size, g.multiple(multiple), g.macroblocks)
        if key not in rounded:
            beta = max(betas[m] for m in g.macroblocks)
            rounded[key] = round_channels(g.size, beta, g.multiple(multiple))
        counts[g.id] = rounded[key]
    return counts


def plan_widths(
    analysis: ModelAnalysis,
    groups: Sequence[GroupInfo],
    rho: Mapping[str, float],
    cost: Cost,
    *,
    width_map: WidthMap | str | None = None,
    budget: Budget | None = None,
    strategy: str = "mbs",
    channel_multiple: int = 8,
    beta_min: float = 0.1,
    latency: Latency | None = None,
    importance: Mapping[int, np.ndarray] | None = None,
    notes: Sequence[str] = (),
    strategy_reason: str = "",
) -> Plan:
    """Choose how many channels each group keeps (see the module docstring).

    `latency` predicts the model's run time from group counts; a `latency=`
    budget needs it. `importance` holds the per-channel scores the shrink step
    keeps channels by, for every free group; the `global` strategy ranks them.
    `notes` (the caller's, e.g. how channels are ranked) follow the plan's own;
    `strategy_reason` says why this strategy runs (the report shows it).
    """
    if strategy not in STRATEGIES:
        raise BadInputError(
            f"unknown {option('--strategy')} {strategy!r}: use {', '.join(STRATEGIES)}"
        )
    if not 0 < beta_min <= 1:
        raise BadInputError(f"{option('--beta-min')} must be in (0, 1], got {beta_min}")
    if channel_multiple < 1:
        raise BadInputError(f"{option('--channel-multiple')} must be >= 1, got {channel_multiple}")
    if budget is not None and "latency" in budget.fractions and latency is None:
        raise ValueError("a latency budget needs a latency model")
    free = [g for g in groups if g.free]
    ranks = strategy == "global" or strategy in COST_AWARE
    if ranks and (importance is None or any(g.id not in importance for g in free)):
        raise ValueError(f"the {strategy} strategy needs the importance of every free group")
    fmap = WidthMap.parse(width_map or default_width_map(strategy))
    redundancy = macroblock_redundancy(analysis, rho)
    full = {g.id: g.size for g in groups}
    params_before, macs_before = cost(full)
    latency_before = latency(full) if latency is not None else 0.0

    def betas(value: float, scale: float, wmap: WidthMap = fmap) -> list[float]:
        f = wmap.with_value(value)
        return [min(1.0, max(beta_min, scale * f(r))) for _, _, r in redundancy]

    def fraction(metric: str, counts: Mapping[int, int]) -> float:
        if metric == "latency":
            return latency(counts) / latency_before if latency_before else 1.0
        params, macs = cost(counts)
        before, after = (params_before, params) if metric == "params" else (macs_before, macs)
        return after / before if before else 1.0

    # Every limit is met when the largest excess over its fraction is <= 0.
    limits = budget.limits if budget is not None else ()

    def excesses(
        counts: Mapping[int, int], meet: Sequence[tuple[str, float]] | None = None
    ) -> dict[str, float]:
        """Each limit's excess (`meet`'s, by default the budget's as `limits` is then)."""
        return {m: fraction(m, counts) - f for m, f in (limits if meet is None else meet)}

    def excess(counts: Mapping[int, int], meet: Sequence[tuple[str, float]] | None = None) -> float:
        return max(excesses(counts, meet).values())

    def step_fractions(
        counts: Mapping[int, int], ids: list[int], new: list[int], metrics: Sequence[str]
    ) -> dict[str, np.ndarray]:
        """Each metric's fraction of `counts` with group ids[j] set to new[j], for each j;
        params and MACs in one vectorised query when the cost model has one."""
        out: dict[str, np.ndarray] = {}
        with_steps = getattr(cost, "with_steps", None)
        if with_steps is not None and ids and any(m != "latency" for m in metrics):
            params, macs = with_steps(counts, ids, new)
            after = {"params": params, "flops": macs}
            before = {"params": params_before, "flops": macs_before}
            for m in metrics:
                if m != "latency":
                    out[m] = after[m] / before[m] if before[m] else np.ones(len(ids))
        for m in metrics:
            if m not in out:
                out[m] = np.array([fraction(m, {**counts, g: n}) for g, n in zip(ids, new)])
        return out

    def step_excess(counts: Mapping[int, int], ids: list[int], new: list[int]) -> list[float]:
        """excess() of `counts` with group ids[j] set to new[j], for each j."""
        if not ids:
            return []
        after = step_fractions(counts, ids, new, [m for m, _ in limits])
        return np.max([after[m] - f for m, f in limits], axis=0).tolist()

    def price_curves(
        counts: Mapping[int, int], weights: Mapping[str, float]
    ) -> dict[int, np.ndarray]:
        """Per free group g: price[k - 1] = what its k-th channel costs, the fractions of the
        metrics in `weights` summed with those weights, g keeping k channels against k - 1 and
        every other group as in `counts`. Read every channel for params and MACs (one
        vectorised query), on a grid of PRICE_STEPS points per group for latency (measured
        in steps)."""
        metrics = list(weights)
        exact = "latency" not in metrics
        ids, ks, spans = [], [], []
        for g in free:
            step = g.multiple(channel_multiple)
            step = 1 if exact else max(step, math.ceil(g.size / PRICE_STEPS))
            grid = sorted({*range(0, g.size + 1, step), g.size})
            spans.append((len(ks), len(ks) + len(grid)))
            ids += [g.id] * len(grid)
            ks += grid
        after = step_fractions(counts, ids, ks, metrics)
        total = np.sum([w * after[m] for m, w in weights.items()], axis=0)
        curves = {}
        for g, (a, b) in zip(free, spans):
            cumulative = np.interp(np.arange(g.size + 1), ks[a:b], total[a:b])
            curves[g.id] = np.diff(cumulative)
        top = max((float(c.max()) for c in curves.values() if c.size), default=0.0)
        # A channel whose cut saves nothing is kept first, never divided by zero.
        floor = 1e-9 * max(top, 1e-12)
        return {g: np.maximum(c, floor) for g, c in curves.items()}

    def excess_at(value: float, scale: float) -> float:
        return excess(_counts(groups, betas(value, scale), channel_multiple))

    own_notes: list[str] = []
    if width_map is not None and budget is not None and strategy in ("uniform", "global"):
        unused = option("--width-map", str(fmap))
        own_notes.append(f"{unused} is not used: {strategy} at a budget has none")
    scale = 1.0
    value = fmap.value
    if strategy != "mbs" and budget is None:
        # MBS's size, this strategy's shape: the baselines compare at equal parameters. The
        # size is MBS's own, at the width map MBS would use (the cost-aware strategies'
        # default map weighs their worth: at f = 1 MBS would keep everything).
        mbs_map = WidthMap.parse(width_map or default_width_map("mbs"))
        mbs_betas = betas(mbs_map.value, 1.0, mbs_map)
        size = fraction("params", _counts(groups, mbs_betas, channel_multiple))
        limits = (("params", size),)
        own_notes.append(
            f"{strategy} matched to the size MBS reaches at {mbs_map} (params {size:.3f})"
        )
    threshold, chosen, weights = None, None, {}
    if strategy == "global":
        ranked, counts_at = _global_ranking(groups, free, importance, channel_multiple, beta_min)
        cut = _solve_cut(lambda k: excess(counts_at(k)), len(ranked))
        counts = counts_at(cut)
        threshold = float(ranked[cut - 1]) if cut else None
    elif strategy in COST_AWARE:
        worth = _channel_worth(analysis, free, redundancy, fmap, cost, full)
        gains = _channel_gains(free, importance, worth)

        def allocate(
            weights: Mapping[str, float], meet: Sequence[tuple[str, float]]
        ) -> tuple[dict[int, int], float | None]:
            return _cost_aware(
                groups,
                free,
                gains,
                lambda counts: price_curves(counts, weights),
                lambda counts: excess(counts, meet),
                channel_multiple,
                beta_min,
                streams_last(strategy, list(weights)),
            )

        counts, threshold, weights = _weigh_limits(
            limits,
            allocate,
            excesses,
            lambda counts: _kept_worth(gains, counts),
        )
    elif strategy == "uniform":
        # The width multiplier: parameter 0 makes every beta equal to the common scale.
        value = 0.0
        scale = 1.0 - _solve(lambda k: excess_at(0.0, 1.0 - k), 0.0, 1.0 - beta_min)
    elif budget is not None:
        top = fmap.maximum
        if excess_at(top, 1.0) <= 0:
            value = _solve(lambda v: excess_at(v, 1.0), 0.0, top)
        else:
            # Macroblocks without redundancy never shrink through the parameter alone:
            # past its maximum, a common scale takes the rest, keeping MBS's proportions.
            value = top
            scale = 1.0 - _solve(lambda k: excess_at(top, 1.0 - k), 0.0, 1.0 - beta_min)
            own_notes.append(
                f"{fmap.knob} capped at {top:g}; a common scale {scale:.3f} reaches the budget"
            )
    if strategy in ("mbs", "uniform"):
        chosen = betas(value, scale)
        counts = _counts(groups, chosen, channel_multiple)
    # A budget, or the size a baseline is matched to. Under `global` the cut is already the
    # fewest channels that fit; the gap left is at most one multiple of one group (where the
    # next channel cut crosses a rounding step), and the same up-steps fill it, so every
    # strategy lands as close to the budget.
    if limits:
        counts = _nudge(counts, groups, excess, step_excess, channel_multiple, beta_min)
    if budget is not None and _over_budget(budget, lambda m: fraction(m, counts)):
        if not free:  # beta_min and the multiple decide nothing: the one reason
            raise BadInputError(
                f"budget {budget} cannot be reached: every channel group is pinned (kept whole: "
                "its channels reach a graph input or output, or an op that is not followed), "
                "so nothing can be cut"
            )
        smallest = _counts(groups, [beta_min] * len(redundancy), channel_multiple)
        pinned = sum(g.pinned for g in groups)
        units = sum(g.size == 1 for g in free)
        reasons = [
            f"{pinned} pinned group{'s' if pinned != 1 else ''} stay whole" if pinned else "",
            f"{units} free group{' is a' if units == 1 else 's are'} single unit{'s' * (units > 1)}"
            f" ({SINGLE_UNIT})"
            if units
            else "",
            option("--beta-min", beta_min),
            option("--channel-multiple", channel_multiple),
            "parameters outside Conv channel groups (e.g. the head) stay",
        ]
        kept = ", ".join(
            f"{m} {_percent_above(fraction(m, smallest), f)}" for m, f in budget.limits
        )
        raise BadInputError(
            f"budget {budget} cannot be reached: the smallest plan keeps {kept} "
            f"({'; '.join(filter(None, reasons))}); ask for a larger fraction"
        )
    params_after, macs_after = cost(counts)
    blocks = [
        MacroblockPlan(
            index=m.index,
            resolution=m.resolution,
            effective_flops=e,
            base_effective_flops=eb,
            redundancy=r,
            beta=None if chosen is None else chosen[m.index],
            kept=_kept_fraction(groups, counts, m.index),
        )
        for m, (e, eb, r) in zip(analysis.macroblocks, redundancy)
    ]
    return Plan(
        strategy=strategy,
        width_map=None if strategy == "global" else fmap.with_value(value),
        receptive_field=analysis.receptive_field,
        scale=scale,
        beta_min=beta_min,
        channel_multiple=channel_multiple,
        macroblocks=blocks,
        counts=counts,
        sizes=full,
        params=(params_before, params_after),
        macs=(macs_before, macs_after),
        budget=budget,
        notes=[*own_notes, *notes],
        strategy_reason=strategy_reason,
        threshold=threshold,
        prices=dict(weights),
    )


# Params and MACs are counted exactly: a plan over their budget by any amount misses it. The
# latency model is a prediction, checked and re-planned on the measured model (pipeline).
LATENCY_SLACK = 0.02


def _over_budget(budget: Budget, fraction: Callable[[str], float]) -> bool:
    """Whether a plan at these fractions misses a limit (the nudge has done what it can)."""
    return any(
        fraction(m) - f > (LATENCY_SLACK if m == "latency" else 1e-12) for m, f in budget.limits
    )


def _percent_above(value: float, asked: float) -> str:
    """`value` as a percentage, with the decimals it takes to read above `asked` when it is
    (4.03% against 0.0402, where 4.0% read as less)."""
    digits = 1
    while digits < 6 and value > asked and round(value * 100, digits) <= round(asked * 100, 6):
        digits += 1
    return f"{value:.{digits}%}"


def _kept_fraction(groups: Sequence[GroupInfo], counts: Mapping[int, int], block: int) -> float:
    made = [g for g in groups if block in g.macroblocks]
    before = sum(g.size for g in made)
    return sum(counts[g.id] for g in made) / before if before else 1.0


def _channel_worth(
    analysis: ModelAnalysis,
    free: Sequence[GroupInfo],
    redundancy: Sequence[tuple[float, float, float]],
    fmap: WidthMap,
    cost: Cost,
    full: Mapping[int, int],
) -> dict[int, float]:
    """Per free group g: its weight W(g) = f(R(m)) * rho(m) * MACs(g) / MACs of the model,
    the share of the model's effective flops g carries (MACs(g): the MACs of the layers
    whose channels g feeds or makes, at the activation density rho(m) = E(m) / MACs(m) of its
    macroblock), scaled by MBS's width map of the macroblock's redundancy. m is the group's
    macroblock of largest f (MBS gives a group the largest beta of its macroblocks)."""
    macs_before = cost(full)[1]
    ids = [g.id for g in free]
    with_steps = getattr(cost, "with_steps", None)
    if with_steps is not None and ids:
        without = with_steps(full, ids, [0] * len(ids))[1]
    else:
        without = np.array([cost({**full, g: 0})[1] for g in ids], dtype=np.float64)
    worth = {}
    for g, left in zip(free, np.asarray(without, dtype=np.float64).tolist()):
        m = max(g.macroblocks, key=lambda b: fmap(redundancy[b][2]))
        effective, _, r = redundancy[m]
        macs = analysis.macroblocks[m].macs
        rho = effective / macs if macs else 1.0
        share = (macs_before - left) / macs_before if macs_before else 1.0
        worth[g.id] = fmap(r) * rho * share
    return worth


def _channel_gains(
    free: Sequence[GroupInfo], importance: Mapping[int, np.ndarray], worth: Mapping[int, float]
) -> dict[int, np.ndarray]:
    """Per free group g: gain[k - 1] = worth(g, k) = W(g) * log(S_g(k) / S_g(k - 1)), what its
    k-th most important channel is worth (see _cost_aware). The first channel is never
    weighed (beta_min keeps it): inf; one scored 0 is worth 0 (dead under act; under the
    weight criteria zero filters, which still output their bias as a constant)."""
    gains = {}
    for g in free:
        raw = np.sort(np.asarray(importance[g.id], dtype=np.float64))[::-1]
        kept = np.cumsum(raw)
        with np.errstate(divide="ignore", invalid="ignore"):
            gain = np.log(kept[1:] / kept[:-1]) if raw.size else raw
        weighted = worth[g.id] * np.nan_to_num(gain, nan=0.0, posinf=np.inf)
        # the first channel stays inf at any worth: a group worth 0 (rho 0) made it 0 * inf, NaN
        gains[g.id] = np.concatenate([[np.inf], weighted])[: raw.size]
    return gains


def _kept_worth(gains: Mapping[int, np.ndarray], counts: Mapping[int, int]) -> float:
    """sum_g W(g) * log(S_g(c_g) / S_g(1)): the worth the counts keep, what mbs-cost
    maximises (S_g(1) is a constant of the model)."""
    return float(sum(gain[1 : counts[g]].sum() for g, gain in gains.items()))


def _weigh_limits(
    limits: Sequence[tuple[str, float]],
    allocate: Callable[
        [Mapping[str, float], Sequence[tuple[str, float]]], tuple[dict[int, int], float | None]
    ],
    excesses: Callable[[Mapping[int, int]], dict[str, float]],
    kept_worth: Callable[[Mapping[int, int]], float],
) -> tuple[dict[int, int], float | None, dict[str, float]]:
    """mbs-cost's counts, multiplier and price weights under every limit of a budget.

    The optimum of "most worth within every limit" has one multiplier per limit, and only a
    limit that binds has one above 0: a channel's price is the limits' fractions weighed by
    them. So each limit is planned alone first (`allocate(weights, limits to meet)`, priced
    by that metric and cut to that limit, as a budget of it alone would be): a plan that
    meets every other limit too is the optimum, that limit binds and the others keep room.
    When none does, each limit's own plan overshoots another, and the optimum meets two at
    once: the weight between their prices is bisected (MIX_STEPS times), each try cut until
    every limit is met, towards where both bind (the limit the cut stopped on weighs more),
    until both are within BINDS_WITHIN of their fractions.
    Of the plans that meet every limit, the one keeping the most worth is returned (where
    none does, the one of most worth: the caller refuses it). Summed prices (equal weights) met
    the binding limit but overshot the other: params=0.6,flops=0.6 kept 0.26 of
    MobileNetV2's parameters (0.60 now, flops 0.60 both times).
    """
    tried: list[tuple[bool, float, int, dict[int, int], float | None, dict[str, float]]] = []

    def excess(weights: dict[str, float], meet: Sequence[tuple[str, float]]) -> dict[str, float]:
        """Plans at these weights, cut to meet `meet`; each limit's excess."""
        counts, multiplier = allocate(weights, meet)
        over = excesses(counts)
        fits = max(over.values()) <= 0
        tried.append((fits, kept_worth(counts), -len(tried), counts, multiplier, weights))
        return over

    for metric, fraction in limits:
        excess({metric: 1.0}, [(metric, fraction)])
    if len(limits) > 1 and not any(t[0] for t in tried):
        for a, b in itertools.combinations([m for m, _ in limits], 2):
            low, high = 0.0, 1.0  # a's weight: a alone overshoots b's limit, b alone a's
            for _ in range(MIX_STEPS):
                mid = (low + high) / 2
                over = excess({a: mid, b: 1.0 - mid}, limits)
                at = max(over, key=over.__getitem__)  # the limit the cut stopped on
                if at not in (a, b) or min(over[a], over[b]) >= -BINDS_WITHIN:
                    break  # a third limit stops it, or both bind
                low, high = (mid, high) if at == a else (low, mid)
    best = max(tried, key=lambda t: t[:3])
    return best[3], best[4], best[5]


def _cost_aware(
    groups: Sequence[GroupInfo],
    free: Sequence[GroupInfo],
    gains: Mapping[int, np.ndarray],
    price_curves: Callable[[Mapping[int, int]], dict[int, np.ndarray]],
    excess: Callable[[Mapping[int, int]], float],
    multiple: int,
    beta_min: float,
    joined_last: bool = False,
) -> tuple[dict[int, int], float | None]:
    """Counts and the multiplier lambda of the cost-aware allocation.

    It keeps the counts c that maximise sum_g W(g) * log S_g(c_g) - lambda * cost(c), with
    W(g) from _channel_worth and S_g(k) the importance of g's k most important channels: a
    group's worth grows with the log of the importance it keeps (every halving costs alike,
    as uniform scaling assumes), weighted by the effective flops it carries. So the k-th
    channel of g is worth W(g) * log(S_g(k) / S_g(k - 1)) (`gains`, _channel_gains) and
    costs price_g(k), what the priced metric(s) grow by from k - 1 to k channels (weighed
    as _weigh_limits chose). Every channel is ranked by worth / price,
    and the fewest lowest-ranked whose cut meets every limit are cut (bisection over the
    ranking; lambda is the ratio of the last one cut). A group's price depends on its
    neighbours' counts (a conv's MACs are c_in * c_out), so prices are read again at the
    counts they gave, until the counts settle or PRICE_ROUNDS have passed.

    With `joined_last` (`mbs-branch`, see streams_last) every channel of a joined group
    ranks after every channel of the others: a stream is cut only once every branch is at
    its floor. The ranking alone cannot choose between a stream and the branches that read
    and write it: a block costs stream width x branch width, and W(stream) is the sum of
    the W(branch)es on it (both are MACs shares), so with flat importance
    W log s + W log b is the same for every split of s * b, and the importance decides by
    chance. A cut branch channel is lost to one block, a cut stream channel to every block.
    """
    counts = {g.id: g.size for g in groups}
    multiplier = None
    for _ in range(PRICE_ROUNDS):
        price = price_curves(counts)
        ratios = {g: gains[g] / price[g] for g in gains}
        ranked, counts_at = _global_ranking(
            groups, free, ratios, multiple, beta_min, False, last=joined_last
        )
        cut = _solve_cut(lambda k, at=counts_at: excess(at(k)), len(ranked))
        found = counts_at(cut)
        multiplier = float(ranked[cut - 1]) if cut else None
        if found == counts:
            break
        counts = found
    return counts, multiplier


def streams_last(strategy: str, metrics: Sequence[str]) -> bool:
    """Whether the joined groups rank last: under `mbs-branch`, where every limit's cost is
    a product of widths (params, MACs) and so cannot tell a stream from its branches. A
    latency limit prices each conv as measured, which tells them apart: ranked as mbs-cost."""
    return strategy == "mbs-branch" and "latency" not in metrics


def cost_aware_formula(plan: Plan) -> str:
    """The mbs-cost formula with the numbers used."""
    fmap = plan.width_map
    f = "1 - c * R(m)" if fmap.kind == "linear" else "(1 - R(m)) ** gamma"
    cut = "nothing cut" if plan.threshold is None else f"lambda = {plan.threshold:.4g}"
    priced = (
        f"the fraction of the original {plan.price_text or 'cost'}"
        if len(plan.priced) < 2
        else f"{plan.price_text} (fractions of the original; neither limit's own plan meets "
        "the other, so the weights are bisected towards where both bind)"
    )
    return (
        f"cost-aware MBS: g keeps its k-th channel while worth(g, k) / price(g, k) > lambda; "
        f"worth(g, k) = W(g) * log(S_g(k) / S_g(k - 1)), S_g(k) the importance of g's k most "
        f"important channels; W(g) = f(R(m_g)) * rho(m_g) * MACs(g) / MACs, MACs(g) those of "
        f"the layers g feeds or makes, rho(m) = E(m) / MACs(m), f = {f} with {fmap.knob} = "
        f"{fmap.value:g}, R(m) = 1 - E_B(m) / E(m), m_g the group's macroblock of largest f; "
        f"price(g, k) = what {priced} grows by from k - 1 to k channels "
        f"of g, the other groups as planned; {cut} by bisection over the ranking, so "
        f"that every limit is met; counts rounded up to a multiple of {plan.channel_multiple}, "
        f"never below beta_min = {plan.beta_min:g} of the group; "
        + (
            "joined groups (residual streams: an Add joins their channels) ranked after "
            "every other group, cut only once those are at their floor; "
            if streams_last(plan.strategy, plan.priced)
            else ""
        )
        + "base B(m): "
        + BASE_RULES[plan.receptive_field]
    )


def _global_ranking(
    groups: Sequence[GroupInfo],
    free: Sequence[GroupInfo],
    importance: Mapping[int, np.ndarray],
    multiple: int,
    beta_min: float,
    normalise: bool = True,
    last: bool = False,
) -> tuple[np.ndarray, Callable[[int], dict[int, int]]]:
    """Every free channel ranked by normalised importance, lowest first, and the counts
    when the lowest k are cut.

    Importance is normalised per group by dividing by the group's mean, as Torch-Pruning's
    default global pruning does (`GroupMagnitudeImportance(normalizer="mean")`): raw
    scores of different groups live on unrelated scales (filter norms grow with fan-in,
    activations with the BatchNorm before them), and without it the group with the
    smallest scale would be cut first whatever its channels do. After it, a channel is
    ranked by how it compares with its own group's average. A zero score (dead under act;
    zero filters under the weight criteria, whose bias may still be a constant the next
    layer reads) stays zero and is cut first anywhere. A group whose scores are all zero keeps
    its raw zeros. Cutting more never keeps more in any group, so the size falls with k.
    With `normalise` False the scores are ranked as given (mbs-cost's worth / price). With
    `last`, every channel of a joined group ranks after every other channel (mbs-branch).
    """
    scores, owner = [], []
    for i, g in enumerate(free):
        raw = np.asarray(importance[g.id], dtype=np.float64)
        mean = float(raw.mean()) if raw.size else 0.0
        scores.append(raw / mean if normalise and mean > 0 else raw)
        owner.append(np.full(g.size, i))
    flat = np.concatenate(scores) if scores else np.zeros(0)
    owners = np.concatenate(owner) if owner else np.zeros(0, dtype=int)
    tier = np.array([last and g.joined for g in free], dtype=bool)[owners]
    order = np.lexsort((flat, tier))  # by tier, then score; stable
    ranked, owners = flat[order], owners[order]

    def counts_at(cut: int) -> dict[int, int]:
        left = np.bincount(owners[cut:], minlength=len(free))
        counts = {g.id: g.size for g in groups}
        for g, kept in zip(free, left.tolist()):
            counts[g.id] = round_channels(
                g.size, max(beta_min, kept / g.size), g.multiple(multiple)
            )
        return counts

    return ranked, counts_at


def _solve_cut(excess_at: Callable[[int], float], n: int) -> int:
    """The fewest lowest-ranked channels in [0, n] whose cut brings the excess to <= 0
    (n when none does): a bisection, since the excess falls as more are cut."""
    lo, hi = 0, n
    if excess_at(lo) <= 0:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if excess_at(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return hi


def _solve(excess_at: Callable[[float], float], lo: float, hi: float) -> float:
    """The smallest knob in [lo, hi] whose excess is <= 0 (excess falls as the knob grows)."""
    if excess_at(lo) <= 0:
        return lo
    if excess_at(hi) > 0:
        return hi
    for _ in range(40):
        mid = (lo + hi) / 2
        if excess_at(mid) <= 0:
            hi = mid
        else:
            lo = mid
    return hi


def _nudge(
    counts: dict[int, int],
    groups: Sequence[GroupInfo],
    excess: Callable[[Mapping[int, int]], float],
    step_excess: Callable[[Mapping[int, int], list[int], list[int]], list[float]],
    multiple: int,
    beta_min: float,
) -> dict[int, int]:
    """Close the gap rounding leaves, one channel-multiple step at a time.

    While over the budget (excess > 0), take the step down that removes least;
    then, while some step up still fits the budget, take the one that lands
    closest to it. Small steps keep the shape MBS chose. No step goes below a
    group's floor, `beta_min` of it rounded up as every count is: a budget that
    needs more is out of reach. `step_excess` prices every group's step at once
    (thousands of steps on ResNet-1202).
    """
    counts = dict(counts)
    free = [g for g in groups if g.free]
    floor = {g.id: round_channels(g.size, beta_min, g.multiple(multiple)) for g in free}
    current = excess(counts)

    def steps(direction: int) -> list[tuple[float, int, int]]:
        """(excess, group, new count) of each group's step, in the order of `free`."""
        ids, new = [], []
        for g in free:
            count = counts[g.id] + direction * g.multiple(multiple)
            count = min(g.size, count) if direction > 0 else count
            if count != counts[g.id] and floor[g.id] <= count <= g.size:
                ids.append(g.id)
                new.append(count)
        return list(zip(step_excess(counts, ids, new), ids, new))

    def take(options: list[tuple[float, int, int]]) -> bool:
        """Take the option with the largest excess (the first of equals), if any."""
        nonlocal current
        if not options:
            return False
        current, group, count = max(options, key=lambda o: o[0])
        counts[group] = count
        return True

    while current > 0 and take([o for o in steps(-1) if o[0] < current]):
        pass
    while take([o for o in steps(+1) if current < o[0] <= 0]):
        pass
    return counts

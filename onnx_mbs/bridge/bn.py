"""BatchNorm for BN-folded graphs: re-inserted for training, folded back on write-back.

Deployment exports fold BatchNorm into the Conv before it. Trained as they are, such graphs have
nothing that re-normalises activations, and a reduced model retrained with a BN network's recipe
diverges. So for training the bridge puts a BatchNormalization after every Conv with a bias whose
output feeds no BatchNormalization (and is not a graph output). Its running statistics are the
conv output's per-channel mean and variance measured on the training data. Its affine is the
statistics that conv's output should have: with a reference graph (the teacher, i.e. the
unreduced original) the same conv's output statistics there, channel by channel; without one the
model's own, so that it computes the same function at the start.

The reference matters after a reduction: removing channels shifts the statistics of the kept
conv outputs (the reduced ResNet-20 drops from 94% to 54% top-1). A BN-kept graph trains with
batch statistics, so its trained affine puts every channel back where the unreduced network had
it from the first step (the same effect as BN recalibration, 54% -> 89%); a BN re-inserted with
the reduced model's own statistics as affine instead preserves the damage, and the folded graph
retrained 2.5 points worse than the kept one with the same recipe. The reference's statistics
give the folded graph what the kept graph's affine carries.

Training then uses batch statistics; `fold_back` folds each BN into its Conv and writes the
weights into the original graph, whose nodes and names are unchanged.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnx_mbs.bridge.module import OnnxModule, is_alias, with_outputs
from onnx_mbs.bridge.ops import BN_POOL, PassMeasured, PooledStatistics
from onnx_mbs.bridge.precision import write_values
from onnx_mbs.passes.domains import FUSED_ACTIVATIONS, FUSED_CONV, op_id
from onnx_mbs.passes.graph import default_opset

EPS = 1e-5
# The convs a BN may have been folded into: onnxruntime's FusedConv is a Conv with its
# activation (and a residual Add) fused after it, its B holding the BN as a Conv's does.
CONVS = ("Conv", FUSED_CONV)


@dataclass(frozen=True)
class InsertedBN:
    """One re-inserted BatchNormalization: the Conv it follows and the names it added."""

    conv: str  # node name
    weight: str  # the Conv's weight initializer
    bias: str  # the Conv's bias initializer
    conv_output: str  # the tensor the BN normalises (the Conv's original output)
    scale: str
    shift: str
    mean: str
    var: str


def has_batchnorm(model: onnx.ModelProto) -> bool:
    return any(op_id(n) == "BatchNormalization" for n in model.graph.node)


def is_bn_folded(model: onnx.ModelProto) -> bool:
    """Whether the graph looks BN-folded: fewer than half of its Convs feed a BatchNorm (a BN-kept
    export has one after nearly every Conv; a folded one only where folding was impossible)."""
    graph = model.graph
    normalised = {n.input[0] for n in graph.node if op_id(n) == "BatchNormalization"}
    convs = [n for n in graph.node if op_id(n) in CONVS]
    return bool(convs) and 2 * sum(c.output[0] in normalised for c in convs) < len(convs)


def stored_initializers(model: onnx.ModelProto) -> Callable[[str], str | None]:
    """A lookup: the initializer a tensor name is, directly or through a chain of Identity /
    float Casts each read only by the next (weights stored in bf16 and cast before use); None
    when it is not one. The graph is indexed once, as callers ask for every Conv's inputs."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producers = {o: node for node in graph.node for o in node.output}
    readers = Counter(used for node in graph.node for used in node.input)

    def stored(name: str) -> str | None:
        while name not in inits:
            node = producers.get(name)
            if node is None or not is_alias(node) or readers[name] != 1:
                return None
            name = node.input[0]
        return name

    return stored


def foldable_convs(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Convs of `defused(model)` (FusedConvs as the Convs they fuse) a BN can be re-inserted
    after: biased, own (unshared) weights, output not already normalised and not a graph
    output. Weights may be cast from another float type first."""
    model = defused(model)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    stored = stored_initializers(model)
    found = []
    for node in graph.node:
        if op_id(node) != "Conv" or len(node.input) < 3 or not node.input[2]:
            continue
        out = node.output[0]
        weight, bias = stored(node.input[1]), stored(node.input[2])
        if weight is None or bias is None or out in outputs:
            continue
        if len(readers[weight]) > 1 or len(readers[bias]) > 1:
            continue
        if any(op_id(r) == "BatchNormalization" for r in readers.get(out, [])):
            continue
        found.append(node)
    return found


def conv_output_stats(
    model: onnx.ModelProto, names: list[str], batches: Iterable[torch.Tensor]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, variance) of tensors `names` over `batches`, computed in float64."""
    module = OnnxModule(with_outputs(model, names)).eval()
    where = [module.output_names.index(name) for name in names]
    sums: dict[str, list] = {}
    with torch.no_grad():
        for xb in batches:
            outs = module(xb)
            outs = outs if isinstance(outs, tuple) else (outs,)
            for name, i in zip(names, where, strict=True):
                y = outs[i]
                y = y.double().transpose(0, 1).reshape(y.shape[1], -1)
                s = sums.setdefault(name, [0.0, 0.0, 0])
                s[0] = s[0] + y.sum(1)
                s[1] = s[1] + (y * y).sum(1)
                s[2] += y.shape[1]
    stats = {}
    for name, (total, squares, count) in sums.items():
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        stats[name] = (mean.numpy(), var.numpy())
    return stats


def channel_maps(
    model: onnx.ModelProto, reference: onnx.ModelProto, convs: list[onnx.NodeProto]
) -> dict[str, np.ndarray | None]:
    """For each Conv of `convs` (in `model`), keyed by its output tensor: which channel of
    `reference`'s Conv of the same name and output each of its output channels is -- the channel
    with the identical bias (channel removal keeps the kept channels' biases). None when
    `reference` has no such foldable Conv (not followed by a BN) or a bias has no unique match."""
    ref_convs = {n.output[0]: n for n in foldable_convs(reference)}
    inits = {t.name: t for t in model.graph.initializer}
    ref_inits = {t.name: t for t in reference.graph.initializer}
    stored, ref_stored = stored_initializers(model), stored_initializers(reference)
    maps: dict[str, np.ndarray | None] = {}
    for conv in convs:
        maps[conv.output[0]] = None
        ref = ref_convs.get(conv.output[0])
        bias_name = stored(conv.input[2])
        ref_bias_name = ref_stored(ref.input[2]) if ref is not None else None
        if ref is None or ref.name != conv.name or bias_name is None or ref_bias_name is None:
            continue
        bias = numpy_helper.to_array(inits[bias_name]).astype(np.float32)
        ref_bias = numpy_helper.to_array(ref_inits[ref_bias_name]).astype(np.float32)
        hits = [np.flatnonzero(ref_bias == value) for value in bias]
        if all(len(h) == 1 for h in hits):
            found = np.array([int(h[0]) for h in hits], dtype=np.int64)
            if len(np.unique(found)) == len(found):
                maps[conv.output[0]] = found
    return maps


def channel_map(
    model: onnx.ModelProto, reference: onnx.ModelProto, conv: onnx.NodeProto
) -> np.ndarray | None:
    """`channel_maps` for one Conv."""
    return channel_maps(model, reference, [conv])[conv.output[0]]


def defused(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose FusedConvs are the ops they fuse: a Conv of the same name and
    attributes (output `<output>__conv`), the Add of Z, the activation making the FusedConv's
    output; so a BN can go where it was folded, between the conv and the rest. Weights keep
    their names, so the trained values are written into `model`'s FusedConvs. An activation
    the bridge does not run fused is left fused (and refused when the module is built)."""
    if not any(op_id(n) == FUSED_CONV for n in model.graph.node):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph, old_clip = out.graph, default_opset(model) < 11
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kind = attrs.pop("activation", b"").decode() if op_id(node) == FUSED_CONV else None
        params = list(attrs.pop("activation_params", []))
        wanted = FUSED_ACTIVATIONS[FUSED_CONV].get(kind) if kind else ()
        if kind is None or wanted is None or len(params) != len(wanted):
            nodes.append(node)  # not a FusedConv, or one the module refuses
            continue
        y, steps = node.output[0], []
        if len(node.input) > 3 and node.input[3]:
            steps.append(("Add", [node.input[3]], {}))
        if kind == "Clip" and not old_clip:
            bounds = [f"{y}__clip_{end}" for end in ("min", "max")]
            for name, value in zip(bounds, params, strict=True):
                graph.initializer.append(numpy_helper.from_array(np.float32(value), name))
            steps.append(("Clip", bounds, {}))
        elif kind:
            steps.append((kind, [], dict(zip(wanted, params, strict=True))))
        x = f"{y}__conv" if steps else y
        nodes.append(helper.make_node("Conv", node.input[:3], [x], name=node.name, **attrs))
        for i, (op, more, extra) in enumerate(steps):
            into = y if i == len(steps) - 1 else f"{y}__{op.lower()}"
            nodes.append(
                helper.make_node(op, [x, *more], [into], name=f"{node.name}__{op}", **extra)
            )
            x = into
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def reinsert_bn(
    model: onnx.ModelProto,
    batches: Iterable[torch.Tensor],
    reference: onnx.ModelProto | None = None,
) -> tuple[onnx.ModelProto, list[InsertedBN]]:
    """A training copy of `model` with a BN after each foldable Conv, running statistics measured
    on `batches`. Without `reference` it computes the same function (in eval mode). With one
    (the unreduced graph, e.g. the teacher) each BN's affine is that Conv's output statistics in
    `reference` where its channels can be matched, as a BN-kept graph's trained affine is."""
    given = model
    model = defused(model)
    reference = defused(reference) if reference is not None else None
    convs = foldable_convs(model)
    if not convs:
        return given, []
    wanted = [c.output[0] for c in convs]
    batches = list(batches)
    stats = conv_output_stats(model, wanted, batches)
    targets = {}
    if reference is not None:
        maps = channel_maps(model, reference, convs)
        names = [n for n, m in maps.items() if m is not None]
        if names:
            ref_stats = conv_output_stats(reference, names, batches)
            for n in names:
                m_ref, v_ref = ref_stats[n]
                targets[n] = (m_ref[maps[n]], v_ref[maps[n]])
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    taken = {n for node in graph.node for n in (*node.input, *node.output)}
    taken |= {t.name for t in graph.initializer} | {i.name for i in graph.input}

    def fresh(base: str) -> str:
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    stored = stored_initializers(model)
    inserted: list[InsertedBN] = []
    nodes: list[onnx.NodeProto] = []
    for conv in graph.node:
        nodes.append(conv)
        if op_id(conv) != "Conv" or conv.output[0] not in stats:
            continue
        target = conv.output[0]
        mean, var = stats[target]
        t_mean, t_var = targets.get(target, (mean, var))
        pre = fresh(target + "__prebn")
        names = [fresh(f"{target}__bn_{part}") for part in ("scale", "shift", "mean", "var")]
        values = [np.sqrt(t_var + EPS), t_mean, mean, var]
        for name, value in zip(names, values, strict=True):
            graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
        conv.output[0] = pre
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [pre, *names],
                [target],
                name=fresh(conv.name + "__bn"),
                epsilon=EPS,
                momentum=0.9,
            )
        )
        weight, bias = stored(conv.input[1]), stored(conv.input[2])
        assert weight is not None and bias is not None  # foldable_convs checked
        inserted.append(InsertedBN(conv.name, weight, bias, target, *names))
    del graph.node[:]
    graph.node.extend(nodes)
    return out, inserted


def fold_back(
    original: onnx.ModelProto, trained: onnx.ModelProto, inserted: list[InsertedBN]
) -> onnx.ModelProto:
    """`original` with the initializers of `trained` (its BN-inserted copy after training), each
    re-inserted BN folded into its Conv's weight and bias (in float64, stored in their dtype).
    With no BN inserted it only copies the trained values (float32 master weights) into
    `original`'s initializers, each in its dtype."""
    values = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    for bn in inserted:
        w = values[bn.weight].astype(np.float64)
        b = values[bn.bias].astype(np.float64)
        gamma, beta = values[bn.scale].astype(np.float64), values[bn.shift].astype(np.float64)
        mean, var = values[bn.mean].astype(np.float64), values[bn.var].astype(np.float64)
        factor = gamma / np.sqrt(var + EPS)
        values[bn.weight] = w * factor.reshape(-1, *([1] * (w.ndim - 1)))
        values[bn.bias] = (b - mean) * factor + beta
    return write_values(original, values)


def recalibration_passes(
    module: OnnxModule, names: Collection[str] | None = None
) -> list[list[str]]:
    """The running means of the BatchNorms to measure (every one with running statistics, or
    those named in `names`), grouped into the passes `recalibrate` measures them in. A BN's
    pass is its depth: the longest chain of measured BNs above it. So every measured BN
    upstream of it is in an earlier pass, and BNs of one pass do not feed each other."""
    depth: dict[str, int] = {}
    levels: dict[str, int] = {}
    for (_, ins, outs), stats in zip(module.dataflow(), running_means(module), strict=True):
        d = max((depth.get(name, 0) for name in ins), default=0)
        if stats is not None and (names is None or stats in names):
            levels[stats] = max(d, levels.get(stats, 0))  # read by two nodes: after both
            d += 1
        for name in outs:
            depth[name] = d
    passes: list[list[str]] = [[] for _ in range(max(levels.values(), default=-1) + 1)]
    for name, level in levels.items():
        passes[level].append(name)
    return [level for level in passes if level]


def running_means(module: OnnxModule) -> list[str | None]:
    """For each node a forward runs (`OnnxModule.dataflow`), the running-mean buffer it
    normalises with if it is a BatchNorm, through the Identity or Cast nodes the module runs
    between them (statistics stored in float16 and cast to float); None for other nodes."""
    buffers = {name for name, key in module.initializer_keys.items() if key in module._buffers}
    source = {name: name for name in buffers}
    means: list[str | None] = []
    for op, ins, outs in module.dataflow():
        if op in ("Identity", "Cast") and ins and ins[0] in source:
            source[outs[0]] = source[ins[0]]
        stats = ins[3] if op == "BatchNormalization" and len(ins) > 4 else None
        means.append(source.get(stats) if stats else None)
    return means


@dataclass(frozen=True)
class Rereads:
    """Batches read again on each iteration (`recalibrate` goes over them once per pass)."""

    make: Callable[[], Iterable[torch.Tensor]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.make())


@torch.no_grad()
def recalibrate(
    module: OnnxModule, batches: Iterable[torch.Tensor], names: Collection[str] | None = None
) -> int:
    """Re-estimate the running statistics of every BatchNorm (or of those whose running mean
    `names` holds) on `batches`, no gradient step: the mean and variance of its input over all
    of them together, pooled from the batch statistics (`ops.PooledStatistics`), batches of one
    sample included (eval mode needs no batch statistics; a (1, C) batch adds its mean, and
    pooling the variance of the means). Returns the number of batches used.

    Each BN is measured on the inputs the written (eval-mode) model gives it: in eval-mode
    forwards, after every measured BN upstream of it has its final statistics, one depth level
    of BNs per pass over `batches` (`recalibration_passes`; precise BN's layered recalibration).
    Measured in train mode instead, as before, each BN's input was normalised upstream with its
    batch's statistics, and a retrain that trained nothing wrote another model (logits moved by
    1.86 of ~16 at batch 16). A pass stops each forward at its last BN (`ops.PassMeasured`), so the
    cost is about (passes + 1) / 2 full forwards over `batches`: 19 passes for the bundled
    ResNet-20's 21 re-inserted BNs. An iterator is read into a list first; `Rereads` reads the
    data again each pass instead.

    After channels are removed, the statistics a BN kept describe the wider model; measured again
    they match what the layers now compute, which recovers much of the accuracy before training.
    Pooled, not averaged: the average of batch variances misses the variance of the batch means.
    The variance is the population one (divided by the count, as `conv_output_stats` and the
    re-inserted BNs' first statistics are), not torch's unbiased running_var, which differs by
    1 / (samples x positions): nothing after a convolution.
    """
    if isinstance(batches, Iterator):
        batches = list(batches)
    reads = Counter(name for name in running_means(module) if name)  # BN nodes reading each
    was_training = module.training
    module.eval()
    count = 0
    try:
        # No BN to measure: one pass that measures nothing counts the batches.
        for wanted in recalibration_passes(module, names) or [[]]:
            pool = PooledStatistics({id(module.initializer(name)): reads[name] for name in wanted})
            token = BN_POOL.set(pool)
            count = 0
            try:
                for xb in batches:
                    count += 1
                    if not wanted:
                        continue
                    pool.start()
                    with suppress(PassMeasured):  # every BN of this pass has seen the batch
                        module(xb)
            finally:
                BN_POOL.reset(token)
            pool.write()
    finally:
        module.train(was_training)
    return count

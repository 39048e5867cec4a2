"""An ONNX graph as a trainable `torch.nn.Module`.

The module keeps the ONNX graph as it is and evaluates it node by node (see `ops.py`), so training
changes weights, never structure, and `write_back` can put the weights into the very same graph.

Initializers are sorted by the role their consumers give them:

- parameters: float weights of Conv/ConvTranspose/Gemm/MatMul/LSTM/GRU, BatchNormalization,
  LayerNormalization and InstanceNormalization scale and bias, PRelu slopes, per-channel
  float constants of Add/Sub/Mul/Div (a scale or bias with one axis above 1) -- except those
  applied to the graph input before any weight (the images' normalisation, baked in front) --
  and embedding tables (the data of a Gather whose indices the model is fed);
- buffers: BatchNormalization running mean and variance (updated in train mode);
- constants: everything else (integer tensors, shapes, split sizes, resize scales, scalars,
  element-wise tables with two or more axes above 1: a detector's grid and anchors).
  Nodes whose inputs are all constants are evaluated once at build time.

A weight keeps its role through the ops in `PASS_OPS` (a fused kernel split in two, a scale
broadcast by Expand): they run on the parameter every forward, so it trains and is written back
in its own layout. A weight computed by any other op from initializers (Mul by a mask, Concat) is
folded at build time and cannot train; `OnnxModule.untrained` names those initializers.

State-dict keys are the initializer names with characters other than letters, digits and "_"
replaced by "_" (made unique); `initializer_keys` maps each ONNX name to its key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from onnx_mbs.bridge.ops import NO_FOLD, OPS, TRAINING_OPS, Node
from onnx_mbs.passes.domains import (
    FUSED_CONV,
    FUSED_GEMM,
    SAVE_AT_BASIC,
    is_onnxruntime_op,
    op_id,
)
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.passes.graph import default_opset, fresh_name, topological_order
from onnx_mbs.passes.parameters import long_axes
from onnx_mbs.passes.read import is_quantized

# (op_type -> input positions) whose float initializers are trained.
WEIGHT_INPUTS = {
    "Conv": {1, 2},
    "ConvTranspose": {1, 2},
    "Gemm": {0, 1, 2},
    "MatMul": {0, 1},
    "BatchNormalization": {1, 2},
    "PRelu": {1},
    "LayerNormalization": {1, 2},
    "InstanceNormalization": {1, 2},
    "LSTM": {1, 2, 3, 7},
    "GRU": {1, 2, 3},
    FUSED_CONV: {1, 2},
    FUSED_GEMM: {0, 1, 2},
}
STAT_INPUTS = {"BatchNormalization": {3, 4}}
# Weights left in their Constant nodes: GroupNorm as torch exports it normalises with an
# InstanceNormalization of per-group ones and zeros there (its affine is the Mul/Add after).
NOT_LIFTED = frozenset({"InstanceNormalization"})
ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}

Step = tuple[Callable[..., Any], tuple[str, ...], tuple[str, ...], bool, tuple[str, ...]]


def unsupported_ops(model: onnx.ModelProto) -> list[str]:
    """Op types in the graph the bridge cannot run, sorted."""
    return sorted({op_id(node) for node in model.graph.node} - set(OPS))


RETRAIN_FLOAT = "; retrain the float model they were made from, then apply them again"


def way_on(model: onnx.ModelProto, missing: Sequence[str], quantized: str = RETRAIN_FLOAT) -> str:
    """What to do about the op types `missing` the bridge lacks: a quantised model trains as
    the float model it was made from (`quantized`: a teacher's advice differs); the ops
    onnxruntime's optimisations above basic write are not in the model it saves at basic.
    Nothing for ops of other domains."""
    nodes = [n for n in model.graph.node if op_id(n) in missing]
    if any(is_quantized(n) for n in nodes):
        return quantized
    if any(is_onnxruntime_op(n) for n in nodes):
        return f"; onnxruntime's optimisations above basic write them: {SAVE_AT_BASIC}"
    return ""


def string_tensors(model: onnx.ModelProto) -> list[str]:
    """The string tensors the module would hold, sorted (torch has no string type): the
    graph's string inputs and outputs, string initializers nodes read, string Constants."""
    graph, string = model.graph, onnx.TensorProto.STRING
    read = {name for node in graph.node for name in node.input}
    strings = {
        vi.name for vi in [*graph.input, *graph.output] if vi.type.tensor_type.elem_type == string
    }
    strings |= {t.name for t in graph.initializer if t.data_type == string and t.name in read}
    for node in graph.node:
        if op_id(node) == "Constant" and any(
            a.name in ("value_string", "value_strings") or a.t.data_type == string
            for a in node.attribute
        ):
            strings.add(node.output[0])
    return sorted(strings)


def initializer_roles(
    model: onnx.ModelProto,
    ignore: frozenset[str] = frozenset(),
    through: frozenset[str] | None = None,
) -> dict[str, str]:
    """Each initializer's role: "parameter", "buffer" or "constant" (see the module docstring).

    Consumers are found through Identity nodes -- the torch exporter ties initializers with equal
    values that way (`b2.weight = Identity(b1.weight)`), and the tie is kept as one parameter --
    and through Casts between float types (weights stored in fp16/bf16, cast before use). A
    weight also keeps its role through `through`'s ops as their data input (a Linear exported
    as MatMul(x, Transpose(W)), depthwise weights stored flat, a fused kernel cut by Slice or
    Split, a kernel picked by Gather, a scale broadcast by Expand): those nodes then run on the
    parameter each forward instead of being folded, so it trains. A per-channel scale or bias
    passes through the layout ops and Expand, not through Slice/Split/Gather (`_CUT_OPS`). The
    data of a Gather whose indices come from the graph inputs is an embedding table: a
    parameter. Statistics do not pass through them (BatchNorm updates its running statistics
    in place). Reads by `ignore`'s op types give no role.
    """
    graph = model.graph
    float_inits = {
        t.name: t
        for t in graph.initializer
        if np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type), np.floating)
    }
    through = PASS_OPS if through is None else through
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))

    def uses(
        name: str, seen: set[str], reshaped: bool = False, cut: bool = False
    ) -> list[tuple[onnx.NodeProto, int, bool, bool]]:
        found = []
        for node, i in consumers.get(name, []):
            layout = i == 0 and op_id(node) in through and not is_embedding(node, i, raw)
            if (is_alias(node) or layout) and node.output[0] not in seen:
                cuts = cut or (layout and op_id(node) in _CUT_OPS)
                for out in filter(None, node.output):  # Split: every part
                    seen.add(out)
                    found += uses(out, seen, reshaped or layout, cuts)
            else:
                found.append((node, i, reshaped, cut))
        return found

    raw = _input_side(graph)
    roles = {t.name: "constant" for t in graph.initializer}
    for name, tensor in float_inits.items():
        for node, i, reshaped, cut in uses(name, {name}):
            if op_id(node) in ignore:
                continue
            embedding = "Gather" in through and is_embedding(node, i, raw)
            if (
                i in WEIGHT_INPUTS.get(op_id(node), ())
                or embedding
                or (
                    op_id(node) in ELEMENTWISE
                    and is_per_channel(tensor.dims)
                    and not cut
                    and not any(other in raw for other in node.input)
                )
            ):
                roles[name] = "parameter"
            elif (
                i in STAT_INPUTS.get(op_id(node), ())
                and roles[name] != "parameter"
                and not reshaped
            ):
                roles[name] = "buffer"
    return roles


def is_embedding(node: onnx.NodeProto, i: int, raw: set[str]) -> bool:
    """Input i of `node` is the table of an embedding lookup: the data of a Gather whose indices
    come from the graph inputs (token ids), a weight whatever reads the rows it picks."""
    return op_id(node) == "Gather" and i == 0 and len(node.input) > 1 and node.input[1] in raw


def indexed_weights(model: onnx.ModelProto) -> list[str]:
    """The initializers that train only by passing through Slice, Split, Gather or Expand (or as
    an embedding table), sorted: before these were followed they stayed as they were, so a
    retraining checkpoint written then holds no value for them."""
    roles = initializer_roles(model)
    before = initializer_roles(model, through=_LAYOUT_OPS)
    return sorted(n for n, r in roles.items() if r == "parameter" != before[n])


def is_per_channel(dims: Sequence[int]) -> bool:
    """A vector along one axis, whatever its rank: what a per-channel scale or bias is stored
    as. A single number is not (`is_single_number`, whatever its rank: so it is not counted
    either), nor a table with two or more axes above 1: a detector's cell grid (1, 1, H, W)
    or anchors (1, A, 2) decode boxes."""
    return long_axes(dims) == 1


def _input_side(graph: onnx.GraphProto) -> set[str]:
    """The tensors computed from the graph inputs before any weight is applied: what an
    element-wise constant does to them is preprocessing baked in front (Sub mean, Div std),
    which training must not move."""
    fixed = {t.name for t in graph.initializer} | {""}
    raw = {i.name for i in graph.input} - fixed
    for node in topological_order(graph):
        outputs = [name for name in node.output if name]
        if all(name in fixed for name in node.input):
            fixed.update(outputs)
        elif (
            op_id(node) not in WEIGHT_INPUTS
            and not (op_id(node) == "Gather" and node.input[0] in fixed)  # an embedding
            and all(n in raw or n in fixed for n in node.input)
        ):
            raw.update(outputs)
    return raw


# Ops a weight keeps its role through (as their data input 0); they are differentiable, and
# the parameter stays the initializer itself, so writing back needs no inverse of them.
_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
PASS_OPS = _LAYOUT_OPS | {"Slice", "Split", "Gather", "Expand"}
# Of those, the ones that can leave one value of a vector (a detector's strides (3,) picked per
# level, a scalar): a per-channel table read through them by Add/Sub/Mul/Div is not known to be
# a scale or bias when the roles are given, so it stays a constant (and is named as untrained
# where what arrives is per-channel: `OnnxModule.untrained`).
_CUT_OPS = frozenset({"Slice", "Split", "Gather"})
# Ops whose output shape is worked out at build time when they read weights.
_SHAPE_KNOWN_OPS = PASS_OPS | {"Identity", "Cast"}


_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def is_alias(node: onnx.NodeProto) -> bool:
    """Identity, or a Cast between float types: the consumer's role passes through it (a weight
    stored in bf16 and cast to float before its Conv is still a weight)."""
    if op_id(node) == "Identity":
        return True
    return op_id(node) == "Cast" and any(
        a.name == "to" and a.i in _FLOAT_TYPES for a in node.attribute
    )


def untie_initializers(
    model: onnx.ModelProto, sources: dict[str, str] | None = None
) -> onnx.ModelProto:
    """A copy where each `Identity(initializer)` node becomes an initializer of its own.

    The torch exporter stores initializers with equal values once and ties the others to it
    through Identity nodes -- freshly initialised BatchNorms share their ones and zeros, and a
    running mean can end up tied to a BN bias. Trained, such ties would force unrelated weights to
    stay equal, so retraining unties them first. The graph computes the same; only those Identity
    nodes are gone.

    Likewise a weight or BatchNorm statistic held by a `Constant` node (some exporters write
    weights that way) becomes an initializer of the same name: the module trains and
    `write_back` writes initializers only, so left in the node it would silently stay as it was.

    `reduce` writes such ties as one initializer read by several nodes (onnx-mbs's normal
    form), so every BatchNormalization input that anything else also reads gets a copy of its
    own: a running statistic must not be trained, nor updated by two BatchNorms.

    `sources`, where given, is filled with each copy's name -> the initializer it copies, so
    that what the user says of an initializer (`--freeze`) holds for its copies.
    """
    sources = {} if sources is None else sources
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    keep = []
    for node in topological_order(graph):
        if op_id(node) == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            inits[copy.name] = copy
            sources[copy.name] = sources.get(node.input[0], node.input[0])
        else:
            keep.append(node)
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)
    _hoist_constant_weights(out)
    _own_batchnorm_inputs(out, sources)
    if out.ir_version < 4:
        _list_as_inputs(out)
    return out


def _list_as_inputs(model: onnx.ModelProto) -> None:
    """IR < 4: every initializer is a graph input too; add those the untying made, in place."""
    graph = model.graph
    listed = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name not in listed:
            graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, init.dims))


def _own_batchnorm_inputs(model: onnx.ModelProto, sources: dict[str, str]) -> None:
    """Give each BatchNormalization input read elsewhere too an initializer of its own, in
    place (the last reader keeps the original)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    reads: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            reads[name] = reads.get(name, 0) + 1
    taken = set(reads) | set(inits) | {o for n in graph.node for o in n.output}
    for node in graph.node:
        if op_id(node) != "BatchNormalization":
            continue
        for k in range(1, min(len(node.input), 5)):
            name = node.input[k]
            if name not in inits or reads[name] < 2:
                continue
            reads[name] -= 1
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[name])
            copy.name = fresh_name(f"{node.name}_{('scale', 'B', 'mean', 'var')[k - 1]}", taken)
            graph.initializer.append(copy)
            sources[copy.name] = sources.get(name, name)
            node.input[k] = copy.name


def _hoist_constant_weights(model: onnx.ModelProto) -> None:
    """Turn float `Constant(value=tensor)` nodes whose value the module would train (or update,
    as BN statistics) into initializers, in place."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    hoisted: dict[str, onnx.TensorProto] = {}
    for node in graph.node:
        if op_id(node) != "Constant" or node.output[0] in outputs or len(node.attribute) != 1:
            continue
        attr = node.attribute[0]
        if attr.name == "value" and attr.t.data_type in _FLOAT_TYPES:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attr.t)
            tensor.name = node.output[0]
            hoisted[tensor.name] = tensor
    if not hoisted:
        return
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    trial.graph.initializer.extend(hoisted.values())
    roles = initializer_roles(trial, NOT_LIFTED)
    wanted = {name for name in hoisted if roles[name] != "constant"}
    if not wanted:
        return
    keep = [n for n in graph.node if not (op_id(n) == "Constant" and n.output[0] in wanted)]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(hoisted[name] for name in sorted(wanted))


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also returns the intermediate tensors `names` (after its own
    outputs, in the order given): how statistics and feature distillation read inside a graph."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.ValueInfoProto(name=name))
            have.add(name)
    return out


def _key(name: str, taken: set[str], module: nn.Module) -> str:
    key = re.sub(r"[^0-9A-Za-z_]", "_", name) or "t"
    if key[0].isdigit():
        key = "t_" + key
    base, k = key, 1
    while key in taken or hasattr(module, key):
        k += 1
        key = f"{base}_{k}"
    taken.add(key)
    return key


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops; float weights are trainable parameters.

    `forward(*inputs)` takes the graph inputs in order (tensors or numpy arrays) and returns the
    graph outputs in order (a single tensor when there is one output). In train mode
    BatchNormalization uses batch statistics and updates its running statistics, and Dropout is
    active; in eval mode they behave as in onnxruntime.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise BadInputError(
                f"the PyTorch bridge does not support these op types: {', '.join(missing)}"
                f"{way_on(model, missing)}"
            )
        if strings := string_tensors(model):
            raise BadInputError(
                f"the PyTorch bridge cannot hold string tensors {strings} (torch has no string "
                "type): retrain the model without them (drop the outputs that pass them out)"
            )
        graph = model.graph
        opset = default_opset(model)
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        roles = initializer_roles(model)
        self.input_names = [i.name for i in graph.input if i.name not in arrays]
        self.output_names = [o.name for o in graph.output]
        self.initializer_keys: dict[str, str] = {}  # ONNX name -> state_dict key
        self.runtime_ops: list[str] = []  # op types run per forward (constant nodes folded away)
        # Initializers (or Constant nodes) folded at build time into a weight: they cannot train
        # (name -> why).
        self.untrained: dict[str, str] = {}

        taken: set[str] = set()
        for name, array in arrays.items():
            if roles[name] == "constant":
                continue
            key = _key(name, taken, self)
            tensor = torch.from_numpy(array.copy())
            if roles[name] == "parameter":
                self.register_parameter(key, nn.Parameter(tensor))
            else:
                self.register_buffer(key, tensor)
            self.initializer_keys[name] = key

        consts = {n: a for n, a in arrays.items() if roles[n] == "constant"}
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        # The float initializers (and Constant nodes) each folded value was computed from, and
        # by which op types.
        origins = {n: {n: frozenset()} for n, a in consts.items() if a.dtype.kind == "f"}
        raw = _input_side(graph)
        steps: list[tuple[Callable, tuple[str, ...], tuple[str, ...], bool]] = []
        for proto in topological_order(graph):
            node = Node.from_proto(proto, opset, consts, shapes)
            op = op_id(proto)  # of the default domain: others were refused above
            fn = OPS[op](node)
            wants_training = op in TRAINING_OPS
            live = [n for n in node.inputs if n]
            if op not in NO_FOLD and all(n in consts for n in live):
                came = _folded_origins(op, [origins.get(n, {}) for n in live])
                for name, value in zip(node.outputs, _fold(fn, node, consts), strict=False):
                    if name:  # "" is an unnamed optional output, not a value
                        consts[name] = value
                        shapes[name] = tuple(value.shape)
                        if came:
                            origins[name] = came
                        elif op == "Constant" and value.dtype.kind == "f":
                            origins[name] = {name: frozenset()}  # a weight stored in the node
                continue
            self.untrained.update(_frozen_weights(proto, consts, origins, raw))
            if op in _SHAPE_KNOWN_OPS and all(n in consts or n in arrays for n in live):
                # A reshaped, tied or cast weight: its shape is known now (a Conv without
                # kernel_shape reads its kernel from it).
                known = {n: consts[n] if n in consts else arrays[n] for n in live}
                for name, value in zip(node.outputs, _fold(fn, node, known), strict=False):
                    shapes[name] = tuple(value.shape)
            steps.append((fn, tuple(node.inputs), tuple(node.outputs), wants_training))
            self.runtime_ops.append(node.op_type)

        # Constants the steps read: floats move with the module (.to(device)), ints stay on CPU.
        used = {n for _, ins, _, _ in steps for n in ins} | set(self.output_names)
        self._cpu_consts: dict[str, torch.Tensor] = {}
        self._const_keys: list[tuple[str, str]] = []
        for name in sorted(used & consts.keys()):
            tensor = torch.from_numpy(np.array(consts[name]))
            if tensor.is_floating_point():
                key = _key("const_" + name, taken, self)
                self.register_buffer(key, tensor, persistent=False)
                self._const_keys.append((name, key))
            else:
                self._cpu_consts[name] = tensor
        self._param_keys = [
            (n, k) for n, k in self.initializer_keys.items() if k in self._parameters
        ]
        self._buffer_keys = [
            (n, k) for n, k in self.initializer_keys.items() if k in self._buffers
        ] + self._const_keys
        self._steps = _with_frees(steps, set(self.output_names))

    def forward(self, *inputs: Any) -> Any:
        if len(inputs) != len(self.input_names):
            raise BadInputError(
                f"the model takes {len(self.input_names)} input(s) {self.input_names}, "
                f"got {len(inputs)}"
            )
        env: dict[str, Any] = dict(self._cpu_consts)
        env[""] = None
        params, buffers = self._parameters, self._buffers
        for name, key in self._param_keys:
            env[name] = params[key]
        for name, key in self._buffer_keys:
            env[name] = buffers[key]
        for name, x in zip(self.input_names, inputs, strict=True):
            env[name] = torch.from_numpy(x).to(self._device()) if isinstance(x, np.ndarray) else x
        training = self.training
        for fn, ins, outs, wants_training, frees in self._steps:
            args = [env[n] for n in ins]
            result = fn(training, *args) if wants_training else fn(*args)
            if type(result) is tuple:
                env.update(zip(outs, result, strict=False))
                env[""] = None  # an unnamed optional output stays what a missing input reads
            else:
                env[outs[0]] = result
            for name in frees:
                del env[name]
        outputs = [env[n] for n in self.output_names]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def dataflow(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
        """(op type, inputs, outputs) of each node a forward runs, in the order it runs them."""
        return [
            (op, ins, outs)
            for op, (_, ins, outs, _, _) in zip(self.runtime_ops, self._steps, strict=True)
        ]

    def _device(self) -> torch.device:
        for tensor in self._parameters.values():
            return tensor.device
        return torch.device("cpu")

    def initializer(self, onnx_name: str) -> torch.Tensor:
        """The parameter or buffer that holds ONNX initializer `onnx_name`."""
        key = self.initializer_keys[onnx_name]
        return self._parameters[key] if key in self._parameters else self._buffers[key]


def _folded_origins(
    op_type: str, inputs: list[dict[str, frozenset[str]]]
) -> dict[str, frozenset[str]]:
    """The initializers a folded node's outputs come from, each with the op types on the way."""
    came: dict[str, frozenset[str]] = {}
    for origin in inputs:
        for name, ops in origin.items():
            came[name] = came.get(name, frozenset()) | ops | {op_type}
    return came


def _frozen_weights(
    node: onnx.NodeProto,
    consts: dict[str, np.ndarray],
    origins: dict[str, dict[str, frozenset[str]]],
    raw: set[str],
) -> dict[str, str]:
    """The initializers `node` reads as a weight (a weight input, or a per-channel operand of
    Add/Sub/Mul/Div on features) through a value folded from them at build time: the module
    holds that value as a constant, so they stay as they are. Name -> why, in words."""
    found: dict[str, str] = {}
    if op_id(node) in NOT_LIFTED:  # GroupNorm's per-group ones and zeros, computed
        return found
    runtime = [n for n in node.input if n and n not in consts]
    for i, name in enumerate(node.input):
        origin = origins.get(name)
        if not origin or name in origin:  # an initializer read as it is: its role says
            continue
        weight = i in WEIGHT_INPUTS.get(op_id(node), ()) or (
            op_id(node) in ELEMENTWISE
            and is_per_channel(consts[name].shape)
            and runtime
            and not any(n in raw for n in runtime)
        )
        if not weight:
            continue
        label = f"{node.op_type} '{node.name or node.output[0]}'"
        for source, ops in origin.items():
            found[source] = (
                f"computed by {'/'.join(sorted(ops))} into what {label} reads as a weight, "
                "folded when the model is built"
            )
    return found


def untrained_line(untrained: dict[str, str]) -> str:
    """One line naming the initializers retraining leaves as they are, grouped by why."""
    by_reason: dict[str, list[str]] = {}
    for name, why in untrained.items():
        by_reason.setdefault(why, []).append(name)
    parts = "; ".join(f"{', '.join(sorted(names))} ({why})" for why, names in by_reason.items())
    ops = ", ".join(sorted(PASS_OPS | {"Identity", "Cast"}))
    return f"not trained, left as they are: {parts}; weights train through {ops} only"


def _fold(fn: Callable, node: Node, consts: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Evaluate a node whose inputs are all constants, once, at build time."""
    args = [torch.from_numpy(np.array(consts[n])) if n else None for n in node.inputs]
    with torch.no_grad():
        result = fn(*args)
    results = result if isinstance(result, tuple) else (result,)
    return [r.numpy().copy() for r in results]


def _with_frees(
    steps: list[tuple[Callable, tuple[str, ...], tuple[str, ...], bool]], keep: set[str]
) -> list[Step]:
    """Attach to each step the values last read there, so eval runs drop them early."""
    last_use: dict[str, int] = {}
    for i, (_, ins, _, _) in enumerate(steps):
        for name in ins:
            last_use[name] = i
    frees: list[list[str]] = [[] for _ in steps]
    produced = {n for _, _, outs, _ in steps for n in outs}
    for name, i in last_use.items():
        if name in produced and name not in keep:
            frees[i].append(name)
    return [(*step, tuple(frees[i])) for i, step in enumerate(steps)]

"""Written models take every input shape the original took.

The analysis runs at one input size: `load` fixes the input shapes and folds the
shape arithmetic into constants (fold.py). A folded constant that follows a
dynamic input dim would tie a written model to that size. Such constants are
found by folding the model again at other sizes (the batch doubled, the other
dims doubled and at odd sizes of their own: `other_shapes`) and comparing, and
each is kept dynamic in one of two ways:

- in the analysis form itself, as a constant valid at every size: a Reshape
  target entry that copies the data's dim (0) or is inferred (-1), Resize sizes
  as scales; the cut edits it like any other constant;
- else in the written model, computed at run time by the original's own nodes
  (`RunTimeShapes`): the shape arithmetic as exported, reading the cut tensors'
  shapes, so that a channel count read from a shape follows the cut. Where the
  cut changed a constant those nodes compute, or the shape of a tensor they read
  (which changes what they compute for constants the cut left alone), their
  run-time value is checked against the model's constant at the analysed size;
  what they cannot give (a channel count written into the arithmetic as a number,
  or read from a cut map) is taken from the constant where it does not follow the
  input size, and refused naming the node otherwise. `counted_channels` finds the
  maps whose channel count would be refused so, for the analysis to pin beforehand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .domains import op_id
from .errors import BadInputError
from .fold import MAX_ELEMENTS, folded_constant, shape_values
from .graph import (
    GraphIndex,
    attributes,
    fresh_name,
    static_shape,
    subgraph_names,
    topological_order,
)

# The sizes a model is folded at besides the analysed one: the batch doubled, the other
# dynamic dims doubled, and those at odd sizes each its own, so that a constant that only
# matches them at the analysed size and its double (a Resize to another map's size, twice
# that map's at sizes divisible by the strides; a Reshape entry equal to the data's width
# at square sizes) is told from one that follows them.
KINDS = ("batch", "doubled", "odd")
# Odd multiples of these are tried where the original does not run at odd sizes (a
# space-to-depth stem, a pixel_unshuffle): with m, sizes divisible by m but not by 2m.
MULTIPLES = (1, 2, 4, 8, 16, 32)


def other_shapes(
    declared: onnx.ModelProto,
    fixed: onnx.ModelProto,
    kind: str,
    first: int = 1,
    by_position: bool = False,
    multiple: int = 1,
) -> dict[str, list[int]]:
    """Every input's shape in `fixed` with the dims `declared` leaves dynamic changed as
    `kind` (one of KINDS) says: "batch" doubles dim 0; "doubled" doubles the dims from
    `first` on; "odd" sets each of those to its own odd size (2s + 1, 2s + 3, ...; a
    dim_param several inputs share, to one; with `by_position`, the dims at one position
    of the inputs that have one size, to one: a stereo pair's heights named apart must
    agree), or its own odd `multiple` (m (2 s/m + 1), m (2 s/m + 3), ...: a model that
    takes even sizes only). Empty when no such dim is dynamic."""
    initializers = {t.name for t in declared.graph.initializer}
    static = {vi.name: static_shape(vi) for vi in fixed.graph.input}
    wanted = (lambda k: k == 0) if kind == "batch" else (lambda k: k >= max(first, 1))
    odd: dict[str, int] = {}  # dim_param (or input:dim) -> its odd size
    other: dict[str, list[int]] = {}
    changed = False
    for vi in declared.graph.input:
        if vi.name in initializers:
            continue
        shape = list(static[vi.name] or ())
        for k, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") or not wanted(k):
                continue
            if kind == "odd":
                key = f"{k}:{shape[k]}" if by_position else d.dim_param or f"{vi.name}:{k}"
                base = 2 * (shape[k] // multiple) + 1 + 2 * len(odd)
                shape[k] = odd.setdefault(key, multiple * base)
            else:
                shape[k] *= 2
            changed = True
        other[vi.name] = shape
    return other if changed else {}


@dataclass
class RunTimeShapes:
    """The original's computation of the folded constants that follow the input size.

    `nodes` (in the original's order) compute them from the shapes of tensors the
    analysis form keeps, and from `constants`; `readers` maps a node of the analysis
    form to the inputs (position, name) it reads them at; `shapes` holds each one's
    shape as folded and `varies` which of its entries follow the input size (None
    where its shape does).
    """

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    constants: list[onnx.TensorProto] = field(default_factory=list)
    readers: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    varies: dict[str, np.ndarray | None] = field(default_factory=dict)
    # the analysed shape of every tensor `nodes` read: a cut that changes one (a channel
    # count read by Size or Shape) may change what they compute for a constant it left alone
    reads: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """Put the computation back into `model` (the analysis form, or a cut, retrained
        or instrumented copy of it that still records its shapes), in place.

        A reader the cut left alone reads the computed value. A reader whose constant the
        cut changed, or whose constant is computed from a tensor the cut reshaped, reads it
        where the computed value agrees at the analysed size, the entries that differ taken
        from the model's constant where they do not follow the input size; anything else is
        refused in one line naming the reader.
        """
        if not self.readers:
            return model
        graph = model.graph
        index = GraphIndex.build(model)
        taken = set(index.producer) | set(index.initializers) | set(index.consumers)
        values: dict[str, np.ndarray] | None = None  # computed on `model`'s shapes when asked
        replaced: set[str] = set()
        reshaped = any(index.shapes.get(name, shape) != shape for name, shape in self.reads.items())
        for node in graph.node:
            for position, name in self.readers.get(node.name, ()):
                now = node.input[position]
                shape = self.shapes[name]  # as folded; absent from a model without weights
                if now == name and index.shapes.get(name, shape) == shape and not reshaped:
                    continue  # untouched by the cut: read the computed value
                if values is None:
                    values = self._values(model, index)
                wanted = index.constant(now)
                computed = values.get(name)
                mixed = _mix(wanted, computed, self.varies[name])
                if mixed is None:
                    raise BadInputError(
                        f"the reduced model cannot keep the input size dynamic: {node.op_type} "
                        f"{node.name!r} reads a shape that follows the input size, and the "
                        "channels cut change it in a way its shape arithmetic cannot compute; "
                        "make the model's input dims static before reducing it (e.g. python -m "
                        "onnxruntime.tools.make_dynamic_shape_fixed)"
                    )
                replaced.add(now)
                if mixed is computed:
                    node.input[position] = name
                    continue
                mask = fresh_name(f"{name}_cut_entries", taken)
                where = fresh_name(f"{name}_cut", taken)
                graph.initializer.append(folded_constant(mixed, mask))
                if now == name:  # the computed value takes this name: keep the constant apart
                    now = fresh_name(f"{name}_as_analysed", taken)
                    graph.initializer.append(folded_constant(wanted, now))
                graph.node.append(
                    onnx.helper.make_node(
                        "Where", [mask, now, name], [where], name=fresh_name(where, taken)
                    )
                )
                replaced.discard(now)  # the Where reads the cut constant
                node.input[position] = where
        computed_here = {o for n in self.nodes for o in n.output}
        present = {t.name for t in graph.initializer if t.name not in computed_here}
        kept = [t for t in graph.initializer if t.name not in computed_here]
        kept += [t for t in self.constants if t.name not in present]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.node.extend(self.nodes)
        _drop_unread(graph, replaced | computed_here)
        produced = {o for n in graph.node for o in n.output}
        apart = {name for n in graph.node for name in n.input} - produced  # weights kept apart
        order = topological_order(graph, apart)
        del graph.node[:]
        graph.node.extend(order)
        return model

    def counted_channels(
        self, model: onnx.ModelProto, index: GraphIndex, chan: dict[str, tuple[int, np.ndarray]]
    ) -> list[tuple[str, str]]:
        """(tensor, reason) for each tensor of `chan` (activation -> (channel axis, ids)) whose
        channel count these nodes read into an entry that follows the input size: a count
        of a map's elements with a dynamic batch (`y / a.numel()`). Cutting its channels
        would change that entry, and no constant can stand for it (`apply` refuses it), so
        the caller keeps its channels whole. Found by computing the constants again with
        one channel fewer on the tensor's channel axis."""
        candidates = sorted(n for n in self.reads if n in chan and self.reads[n][chan[n][0]] > 1)
        if not candidates:
            return []
        base = self._values(model, index)
        op_type = {node.name: node.op_type for node in index.nodes}
        found = []
        for tensor in candidates:
            shape = list(self.reads[tensor])
            shape[chan[tensor][0]] -= 1
            other = self._values(model, index, {tensor: tuple(shape)})
            for reader, constants in sorted(self.readers.items()):
                if any(_follows(base.get(c), other.get(c), self.varies[c]) for _, c in constants):
                    shape_op = next(n.op_type for n in self.nodes if tensor in n.input)
                    found.append(
                        (
                            tensor,
                            f"{op_type[reader]} '{reader}': reads a count of these channels "
                            f"that follows the input size ({shape_op} at run time)",
                        )
                    )
                    break
        return found

    def _values(
        self,
        model: onnx.ModelProto,
        index: GraphIndex,
        reshaped: dict[str, tuple[int, ...]] | None = None,
    ) -> dict[str, np.ndarray]:
        """What `nodes` compute on `model`'s recorded shapes (the analysed size), the
        tensors of `reshaped` taken at the shapes it gives."""
        read = _free_inputs(self.nodes)
        small, large = [], []  # constants whose values fold reads; the others' shapes
        for name in read & set(index.initializers):
            tensor = index.initializers[name]
            if np.prod(tensor.dims) <= MAX_ELEMENTS:
                small.append(tensor)
            else:
                shape = onnx.helper.make_tensor_value_info(name, tensor.data_type, tensor.dims)
                large.append(shape)
        recorded = [*model.graph.value_info, *model.graph.output]
        inputs = [i for i in model.graph.input if i.name in read]
        infos = [vi for vi in recorded if vi.name in read]
        for name, shape in (reshaped or {}).items():
            inputs = [_reshaped(vi, shape) if vi.name == name else vi for vi in inputs]
            infos = [_reshaped(vi, shape) if vi.name == name else vi for vi in infos]
        graph = onnx.helper.make_graph(
            list(self.nodes),
            "run_time_shapes",
            inputs,
            [],
            [t for t in self.constants if t.name not in index.initializers] + small,
            value_info=infos + large,
        )
        return shape_values(onnx.helper.make_model(graph, opset_imports=model.opset_import))


def _reshaped(info: onnx.ValueInfoProto, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return onnx.helper.make_tensor_value_info(info.name, info.type.tensor_type.elem_type, shape)


def _follows(
    before: np.ndarray | None, after: np.ndarray | None, varies: np.ndarray | None
) -> bool:
    """Whether a constant computed as `before`, then as `after` with one channel fewer,
    changed in an entry that follows the input size (what `_mix` cannot mend)."""
    if before is None or after is None or before.shape != after.shape:
        return True
    differ = before != after
    return bool(differ.any() if varies is None else (differ & varies).any())


def _mix(
    wanted: np.ndarray | None, computed: np.ndarray | None, varies: np.ndarray | None
) -> np.ndarray | None:
    """`computed` where it equals `wanted` (the cut constant) everywhere; else the mask of
    the entries `wanted` must supply, when none of them follows the input size; else
    None."""
    if wanted is None or computed is None or wanted.shape != computed.shape:
        return None
    if wanted.dtype != computed.dtype:
        return None
    differ = wanted != computed
    if not differ.any():
        return computed
    if varies is None or varies[differ].any():
        return None
    return differ


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove the initializers among `names` that nothing reads any more."""
    read = {name for node in graph.node for name in node.input}
    read |= {name for node in graph.node for name in subgraph_names(node)}
    read |= {o.name for o in graph.output}
    unread = [k for k, t in enumerate(graph.initializer) if t.name in names - read]
    for k in reversed(unread):
        del graph.initializer[k]


def keep_dynamic(
    base: onnx.ModelProto, others: list[onnx.ModelProto], declared: onnx.ModelProto
) -> tuple[onnx.ModelProto, RunTimeShapes]:
    """`base` (folded at the analysed size) with the folded constants that differ in
    `others` (folded at other sizes) made valid at every size where a constant can be,
    and the original's computation (from `declared`, normalised, not folded) of the
    others. See the module docstring."""
    if not others:
        return base, RunTimeShapes()
    own = {t.name for t in declared.graph.initializer}
    index = GraphIndex.build(base)
    folded = [
        (
            {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name not in own},
            GraphIndex.build(m),
        )
        for m in [base, *others]
    ]
    new: dict[str, np.ndarray] = {}
    resized: dict[str, list[str]] = {}  # Resize node -> its new inputs
    run_time: dict[str, np.ndarray | None] = {}  # name -> entries that vary (None: its shape)
    for name, value in folded[0][0].items():
        values = [v.get(name) for v, _ in folded]
        same_shape = all(v is not None and v.shape == value.shape for v in values)
        if same_shape and all(np.array_equal(v, value) for v in values):
            continue
        readers = index.consumers.get(name, [])
        reader = readers[0] if len(readers) == 1 else None
        data = [i.shapes.get(reader.input[0]) for _, i in folded] if reader else [None]
        fixed = None
        if same_shape and None not in data:
            if op_id(reader) == "Reshape" and reader.input[1] == name:
                fixed = _agnostic_reshape(values, data, attributes(reader))
            elif op_id(reader) == "Resize" and reader.input[-1] == name:
                fixed = _sizes_as_scales(values, data, attributes(reader).get("axes"))
        if fixed is None:
            run_time[name] = np.any([v != value for v in values], axis=0) if same_shape else None
        elif op_id(reader) == "Resize":
            scales = f"{name}_scales"
            new[scales] = fixed
            roi = reader.input[1] if len(reader.input) > 1 else ""
            resized[reader.name] = [reader.input[0], roi, scales]
        else:
            new[name] = fixed
    out = base
    if new:
        out = onnx.ModelProto()
        out.CopyFrom(base)
        for node in out.graph.node:
            if node.name in resized:
                del node.input[:]
                node.input.extend(resized[node.name])
        used = {name for node in out.graph.node for name in node.input}
        kept = [t for t in out.graph.initializer if t.name not in new and t.name in used]
        del out.graph.initializer[:]
        out.graph.initializer.extend(kept)
        for name, value in new.items():
            out.graph.initializer.append(folded_constant(value, name))
    return out, _run_time_shapes(out, declared, run_time, folded[0][0])


def _run_time_shapes(
    model: onnx.ModelProto,
    declared: onnx.ModelProto,
    varies: dict[str, np.ndarray | None],
    values: dict[str, np.ndarray],
) -> RunTimeShapes:
    """The nodes of `declared` that compute `varies`' constants from what `model` (the
    analysis form) keeps: its graph inputs, its nodes' outputs and its other constants."""
    if not varies:
        return RunTimeShapes()
    graph = declared.graph
    producer = {o: k for k, n in enumerate(graph.node) for o in n.output}
    kept = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    constants = {t.name for t in model.graph.initializer} - set(varies)
    own = {t.name: t for t in graph.initializer}
    needed: set[int] = set()
    borrowed: dict[str, onnx.TensorProto] = {}
    stack, seen = list(varies), set()
    while stack:
        name = stack.pop()
        if not name or name in seen or name in kept or name in constants:
            continue
        seen.add(name)
        if name in producer:
            needed.add(producer[name])
            stack.extend(graph.node[producer[name]].input)
        elif name in own:
            borrowed[name] = own[name]
    nodes = []
    for k in sorted(needed):
        node = onnx.NodeProto()
        node.CopyFrom(graph.node[k])
        nodes.append(node)
    readers: dict[str, list[tuple[int, str]]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name in varies:
                readers.setdefault(node.name, []).append((position, name))
    shapes = {vi.name: static_shape(vi) for vi in [*model.graph.input, *model.graph.value_info]}
    reads = {name: shapes[name] for name in _free_inputs(nodes) if shapes.get(name) is not None}
    constants_copied = []
    for tensor in borrowed.values():
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        constants_copied.append(copy)
    return RunTimeShapes(
        nodes=nodes,
        constants=constants_copied,
        readers=readers,
        shapes={name: values[name].shape for name in varies},
        varies=varies,
        reads=reads,
    )


def _free_inputs(nodes: list[onnx.NodeProto]) -> set[str]:
    """The tensors `nodes` read and do not make themselves."""
    return {name for n in nodes for name in n.input if name} - {o for n in nodes for o in n.output}


def _agnostic_reshape(values: list, data: list, attrs: dict) -> np.ndarray | None:
    """A Reshape target valid at every size (`values[i]` is the target when the data
    has shape `data[i]`), or None."""
    first = values[0]
    differ = [k for k in range(len(first)) if any(v[k] != first[k] for v in values)]
    fixed = first.copy()
    for k in differ:
        if not attrs.get("allowzero", 0) and all(
            k < len(d) and v[k] == d[k] for v, d in zip(values, data)
        ):
            fixed[k] = 0
    varying = [k for k in differ if fixed[k] != 0]
    if len(varying) > 1 or (varying and -1 in first.tolist()):
        return None
    for k in varying:
        fixed[k] = -1
    return fixed


def _sizes_as_scales(values: list, data: list, axes: list[int] | None) -> np.ndarray | None:
    """Resize `sizes` that are the data's shape times fixed factors, as `scales`. With
    `axes` (opset 18) both hold one entry per axis of `axes`, in its order."""
    if axes is not None:
        data = [[d[int(a) % len(d)] for a in axes] for d in data]
    if any(len(v) != len(d) for v, d in zip(values, data)):
        return None
    scales = values[0] / np.asarray(data[0], dtype=np.float64)
    if not all(np.allclose(v, np.asarray(d) * scales) for v, d in zip(values, data)):
        return None
    return scales.astype(np.float32)

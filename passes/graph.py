"""A read-only index over an ONNX graph: producers, consumers, shapes, constants.

Analyses need three questions answered fast on graphs with thousands of nodes
(who makes this tensor, who reads it, what shape is it); one pass over the
ModelProto builds the maps, so every later query is a dict lookup.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .domains import op_id, opset_versions
from .errors import BadInputError

FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
}


# The doc_string of every initializer fold.py computes: shape arithmetic (anchors, grids and
# Reshape targets computed from the input size), which is never a parameter.
FOLDED = "folded shape arithmetic (onnx-mbs): computed from the input size, not a parameter"


# Constant attributes that hold a plain tensor value, and the dtype of list/scalar forms.
_CONSTANT_DTYPES = {
    "value": None,
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    """The value of a Constant node, or None for sparse and string constants."""
    if not node.attribute or node.attribute[0].name not in _CONSTANT_DTYPES:
        return None
    attr = node.attribute[0]
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    return np.array(helper.get_attribute_value(attr), dtype=_CONSTANT_DTYPES[attr.name])


def is_weight(tensor: onnx.TensorProto) -> bool:
    """A float initializer that may hold learned values: not one fold.py computed."""
    return tensor.data_type in FLOAT_TYPES and tensor.doc_string != FOLDED


@dataclass
class GraphIndex:
    nodes: list[onnx.NodeProto]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    shapes: dict[str, tuple[int, ...]]
    initializers: dict[str, onnx.TensorProto]
    graph_inputs: list[str]
    graph_outputs: list[str]
    graph: onnx.GraphProto | None = field(default=None, repr=False, compare=False)  # indexed

    @classmethod
    def of(cls, model: onnx.ModelProto, index: GraphIndex | None = None) -> GraphIndex:
        """`index` if given, else a new index of `model`: a caller running several analyses
        on one model indexes it once and passes it on (indexing a 3000-node graph costs
        more than most analyses). An index of another model is a caller's bug."""
        if index is None:
            return cls.build(model)
        if index.graph is not model.graph:
            raise ValueError("this GraphIndex indexes another model: pass GraphIndex.build(model)")
        return index

    @classmethod
    def build(cls, model: onnx.ModelProto) -> GraphIndex:
        graph = model.graph
        producer: dict[str, onnx.NodeProto] = {}
        consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.output:
                if name:
                    producer[name] = node
            for name in node.input:
                if name:
                    consumers.setdefault(name, []).append(node)
        shapes: dict[str, tuple[int, ...]] = {}
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            shape = static_shape(vi)
            if shape is not None:
                shapes[vi.name] = shape
        initializers = {t.name: t for t in graph.initializer}
        for t in graph.initializer:
            shapes[t.name] = tuple(t.dims)
        inits = set(initializers)
        return cls(
            nodes=list(graph.node),
            producer=producer,
            consumers=consumers,
            shapes=shapes,
            initializers=initializers,
            graph_inputs=[i.name for i in graph.input if i.name not in inits],
            graph_outputs=[o.name for o in graph.output],
            graph=graph,
        )

    def source_initializer(self, name: str) -> str | None:
        """The initializer behind `name`, looking through Identity nodes (exporters share
        equal tensors that way)."""
        while name not in self.initializers:
            node = self.producer.get(name)
            if node is None or op_id(node) != "Identity":
                return None
            name = node.input[0]
        return name

    def readers(self, sources: Collection[str]) -> dict[str, list[tuple[int, int]]]:
        """Every (node number, input number) that reads each of `sources`, directly or
        through Identity chains (nodes are in topological order, so one pass finds the
        chains); (-1, -1) for a graph output that is one, listed first."""
        alias = {name: name for name in sources}
        for node in self.nodes:
            if op_id(node) == "Identity" and node.input[0] in alias:
                alias[node.output[0]] = alias[node.input[0]]
        readers: dict[str, list[tuple[int, int]]] = {s: [] for s in sources}
        for name in self.graph_outputs:
            if name in alias:
                readers[alias[name]].append((-1, -1))
        for n, node in enumerate(self.nodes):
            if op_id(node) != "Identity":
                for i, name in enumerate(node.input):
                    if name in alias:
                        readers[alias[name]].append((n, i))
        return readers

    def constant(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, or Identity of one)."""
        source = self.source_initializer(name)
        if source is not None:
            return numpy_helper.to_array(self.initializers[source])
        node = self.producer.get(name)
        if node is not None and op_id(node) == "Constant":
            return constant_value(node)
        return None


def structure_key(model: onnx.ModelProto) -> str:
    """A digest of what structural analyses read: nodes, recorded types and shapes,
    initializer names, types and dims; not weight values, which they never read (a
    model retrained in place keeps its key)."""
    digest = hashlib.sha256()
    graph = model.graph
    for part in [*graph.node, *graph.input, *graph.value_info, *graph.output]:
        digest.update(part.SerializeToString())
    for t in graph.initializer:
        digest.update(f"{t.name}:{t.data_type}:{list(t.dims)};".encode())
    return digest.hexdigest()


def static_shape(value_info: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """The tensor's shape if every dimension is a known integer, else None."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    # An unset dim_value (a dim_param, or nothing) reads as 0; -1 and 0: dynamic (Paddle).
    dims = tuple([d.dim_value for d in tensor_type.shape.dim])
    return dims if not dims or min(dims) > 0 else None


def fresh_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`... the first not in `taken` (which then holds it)."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    taken.add(name)
    return name


def nested_nodes(*graphs: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.NodeProto]:
    """The nodes of `graphs` and of their subgraphs (If branches, Loop bodies...)."""
    todo = list(graphs)
    while todo:
        for node in todo.pop().node:
            yield node
            todo.extend(subgraphs(node))


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the default (ai.onnx) domain: op semantics depend on it."""
    return opset_versions(model).get("", 1)


_INT, _INTS = onnx.AttributeProto.INT, onnx.AttributeProto.INTS


def attributes(node: onnx.NodeProto) -> dict:
    """Node attributes as plain Python values (`onnx.helper.get_attribute_value`'s), ints
    and int lists read directly: they are most of a CNN's, read for every conv."""
    values = {}
    for a in node.attribute:
        kind = a.type
        if kind == _INTS and not a.ref_attr_name:
            values[a.name] = list(a.ints)
        elif kind == _INT and not a.ref_attr_name:
            values[a.name] = a.i
        else:
            values[a.name] = onnx.helper.get_attribute_value(a)
    return values


# Float inputs that configure an op rather than hold learned values.
NOT_PARAMETERS = {
    "BatchNormalization": (3, 4),  # running statistics
    "Clip": (1, 2),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Pad": (1, 2, 3),
    "Dropout": (1,),  # the ratio (inference: unused)
}
SCALAR_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Equal", "Less", "Greater"}


def is_parameter_use(
    node: onnx.NodeProto,
    position: int,
    rank: int,
    constant: Callable[[str], np.ndarray | None] | None = None,
) -> bool:
    """Whether a float constant of rank `rank` read as input `position` of `node` is a
    learned value (`constant`: the value of a constant tensor by name, None if not one).

    BatchNorm statistics, Clip bounds, Resize scales, Pad values and Dropout's ratio are not; nor is
    a 0-d scalar read by an element-wise op (GELU's sqrt(2), HardSwish's 1/6); nor the
    scale and bias of an InstanceNormalization that are all ones and all zeros
    (`_no_affine`).
    """
    if position in NOT_PARAMETERS.get(op_id(node), ()):
        return False
    if op_id(node) == "InstanceNormalization" and position in (1, 2) and constant:
        return not _no_affine(node, constant)
    return not (rank == 0 and op_id(node) in SCALAR_OPS)


def _no_affine(node: onnx.NodeProto, constant: Callable[[str], np.ndarray | None]) -> bool:
    """An InstanceNormalization whose scale is all ones and bias all zeros: what torch's
    exporter writes for GroupNorm (normalised over a view of its groups; its own scale and
    shift are the Mul and Add after) and for InstanceNorm without affine, neither of which
    has a parameter there."""
    scale, bias = constant(node.input[1]), constant(node.input[2])
    return scale is not None and bias is not None and bool(np.all(scale == 1) and not bias.any())


def parameter_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """The initializers that hold learned values, and their sizes: what `count_parameters`
    sums. A float initializer holds learned values when a node reads it as one
    (`is_parameter_use`), or when no node reads it; one tensor an exporter merged from equal
    values (an untrained BN's bias and its running mean, both zeros) is the learned one, as
    torch's `parameters()` counts the bias and not the running mean (a buffer). Folded shape
    arithmetic is never one (`is_weight`), nor an InstanceNormalization's scale and bias of
    ones and zeros (torch's GroupNorm and InstanceNorm without affine: `is_parameter_use`).
    A weight stored in another precision (`stored_casts`) is read as its Cast's readers read
    it: a BatchNorm's running mean stored in fp16 is not a parameter."""
    floats = {t.name: t for t in model.graph.initializer if is_weight(t)}
    # A weight stored in another precision is read by the readers of its Cast.
    stored = {output: cast.input[0] for output, cast in stored_casts(model.graph).items()}

    def constant(name: str) -> np.ndarray | None:
        name = stored.get(name, name)
        return numpy_helper.to_array(floats[name]) if name in floats else None

    read: set[str] = set()
    learned: set[str] = set()
    for node in model.graph.node:
        if node.output and node.output[0] in stored:
            continue
        for k, name in enumerate(node.input):
            name = stored.get(name, name)
            if name in floats:
                read.add(name)
                if is_parameter_use(node, k, len(floats[name].dims), constant):
                    learned.add(name)
    sizes = {
        name: math.prod(t.dims) for name, t in floats.items() if name in learned or name not in read
    }
    return sizes | _nested_parameter_sizes(model.graph)


def _nested_parameter_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    """The float weights the subgraphs of `graph`'s nodes hold (an If branch's own conv
    weight), each under "k:node/graph/name", k numbering the subgraphs (a subgraph may reuse
    an outer name; node and graph names may be empty or alike): learned values as much as the
    main graph's are, however the branch taken reads them."""
    sizes: dict[str, int] = {}
    inners = ((node, inner) for node in nested_nodes(graph) for inner in subgraphs(node))
    for k, (node, inner) in enumerate(inners):
        floats = {t.name: t for t in inner.initializer if is_weight(t)}
        uses: dict[str, list[bool]] = {name: [] for name in floats}
        for reader in nested_nodes(inner):
            for position, name in enumerate(reader.input):
                if name in floats:
                    uses[name].append(is_parameter_use(reader, position, len(floats[name].dims)))
        for name, t in floats.items():
            if not uses[name] or any(uses[name]):  # learned unless read otherwise, as above
                sizes[f"{k}:{node.name}/{inner.name}/{name}"] = math.prod(t.dims)
    return sizes


def stored_casts(
    graph: onnx.GraphProto, types: dict[str, int] | None = None
) -> dict[str, onnx.NodeProto]:
    """The Casts that turn a stored float weight into another float type before use
    (weight-only fp16/bf16, or a weight onnxruntime's fp16 conversion kept for a float32
    op), by output: each output is that weight in its readers' precision (`stored.py`).
    A CastLike to a tensor of known float type (torch's dynamo exporter writes
    `weight.type_as(x)` so) is such a Cast too (`types`: `value_types(graph)`, if the caller
    has it)."""
    weights = {t.name for t in graph.initializer if is_weight(t)}
    candidates = [
        node
        for node in graph.node
        if op_id(node) in ("Cast", "CastLike") and node.input[0] in weights
    ]
    if types is None:
        types = value_types(graph) if any(op_id(n) == "CastLike" for n in candidates) else {}
    return {node.output[0]: node for node in candidates if cast_target(node, types) in FLOAT_TYPES}


def cast_target(node: onnx.NodeProto, types: dict[str, int]) -> int | None:
    """The element type a Cast (its `to`) or CastLike (its second input's type, from `types`:
    `value_types`) makes; None where not known."""
    if op_id(node) == "CastLike":
        return types.get(node.input[1]) if len(node.input) > 1 else None
    return attributes(node).get("to")


def value_types(graph: onnx.GraphProto) -> dict[str, int]:
    """The element type of every tensor `graph` declares or stores."""
    types = {t.name: t.data_type for t in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of the float initializers that hold learned values (`parameter_sizes`): the
    parameter count docs/design.md budgets against. Each tensor counts once, however many
    nodes read it: what the file holds (a tensor shared by two layers, as torch counts a tied
    weight; where an exporter merged equal tensors of several layers, such as the all-ones
    scales of untrained BNs, that is fewer than the torch module's `parameters()`).
    A quantized graph is refused as `load` refuses it (QuantizedModelError): its weights are
    no float initializers, and its float scales are no count of them.
    """
    from .read import refuse_quantized  # read builds on this module

    refuse_quantized(model)
    return sum(parameter_sizes(model).values())


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs `node`'s attributes hold (If branches, a Loop or Scan body)."""
    graphs = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            graphs.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            graphs.extend(attr.graphs)
    return graphs


def subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Every tensor name a node's subgraphs read (outer-scope values included)."""
    names: set[str] = set()
    for graph in subgraphs(node):
        for inner in graph.node:
            names.update(inner.input)
            names |= subgraph_names(inner)
    return names


def topological_order(
    graph: onnx.GraphProto, available: Collection[str] = ()
) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is ready (ONNX asks for it; not every file obeys),
    the values a node's subgraphs read from this graph included, as onnxruntime orders them.
    `available` names tensors given from elsewhere (weights kept apart)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    ready |= set(available)
    made = {name: node for node in graph.node for name in node.output}
    reads = {
        id(node): [*node.input, *sorted(subgraph_names(node) & made.keys() - set(node.output))]
        for node in graph.node
    }
    pending = list(graph.node)
    order: list[onnx.NodeProto] = []
    while pending:
        left = []
        for node in pending:
            if all(name in ready for name in reads[id(node)]):
                order.append(node)
                ready.update(node.output)
            else:
                left.append(node)
        if len(left) == len(pending):
            raise BadInputError(_unordered(left[0], reads, ready, made))
        pending = left
    return order


def _unordered(
    node: onnx.NodeProto,
    reads: dict[int, list[str]],
    ready: set[str],
    made: dict[str, onnx.NodeProto],
) -> str:
    """Why `node` never runs: it, or a node it waits on, reads a tensor no node makes, or it
    waits on a cycle. Followed back through the first tensor each node waits on."""
    path: list[onnx.NodeProto] = []
    while node not in path:
        missing = [n for n in reads[id(node)] if n not in ready]
        if unmade := [n for n in missing if n not in made]:
            return f"node '{node.name}' ({node.op_type}) reads {unmade}, which no node produces"
        path.append(node)
        node = made[missing[0]]
    cycle = path[path.index(node) :]
    steps = " ".join(
        f"'{n.name}' reads {next(x for x in reads[id(n)] if x not in ready)!r} of" for n in cycle
    )
    return f"the graph has a cycle: node {steps} '{node.name}' (no order of its nodes runs)"


# Ops that change values, not where they sit, read with constants beside the image (a Keras
# Rescaling or Normalization layer, which tf2onnx leaves before its Transpose to NCHW).
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Cast", "Identity", "Clip", "Relu"})


# The factors that scale 0..255 pixels to [0, 1] (1/255) or [-1, 1] (1/127.5), with room.
PIXEL_SCALES = (1 / 260, 1 / 120)


def is_pixel_scale(factor: float) -> bool:
    """Whether `factor` scales 0..255 pixels to [0, 1] or [-1, 1] (`PIXEL_SCALES`)."""
    return PIXEL_SCALES[0] < abs(factor) < PIXEL_SCALES[1]


def tensor_readers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor of `graph`, each node once: what the walks from a graph
    input follow where no GraphIndex is built (load, and data fitted to a model, ask before
    one exists)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for tensor in set(node.input):
            readers.setdefault(tensor, []).append(node)
    return readers


def channels_last(index: GraphIndex, name: str) -> bool:
    """Whether graph input `name` holds its channels on its last axis (`input_layout`
    NHWC): the analysis reads its image size, and the channel walk its channels, there."""
    return index.graph is not None and input_layout(index.graph, name) == "NHWC"


def identity_sources(graph: onnx.GraphProto) -> dict[str, str]:
    """Each Identity node's output -> the tensor behind its chain of Identity nodes: exporters
    write Mul(x, Identity(c)), and `c` is a constant all the same."""
    step = {n.output[0]: n.input[0] for n in graph.node if op_id(n) == "Identity" and n.input}
    behind: dict[str, str] = {}
    for name in step:
        source, seen = name, set()
        while source in step and source not in seen:  # any node order; a cycle ends it
            seen.add(source)
            source = step[source]
        behind[name] = source
    return behind


def constant_lookup(graph: onnx.GraphProto) -> Callable[[str], np.ndarray | None]:
    """A lookup of the graph's constant tensors (initializers, Constant nodes, and Identity of
    either) by name, each decoded when asked for: walks that read a few small constants need
    not decode weights (FixInputShapes walks the input at every size it tries)."""
    initializers = {t.name: t for t in graph.initializer}
    nodes = {n.output[0]: n for n in graph.node if op_id(n) == "Constant" and n.output}
    behind = identity_sources(graph)

    def constant(name: str) -> np.ndarray | None:
        name = behind.get(name, name)
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        return constant_value(nodes[name]) if name in nodes else None

    return constant


def _input_front(graph: onnx.GraphProto, name: str) -> list[tuple[str, np.ndarray]]:
    """The element-wise ops by constants (op type, constant) on the one path from the input
    before anything else reads it, through Casts, Identity and Transposes: the preprocessing a
    graph does itself (Keras' Rescaling and Normalization)."""
    constant = constant_lookup(graph)
    readers = tensor_readers(graph)
    front: list[tuple[str, np.ndarray]] = []
    tensor = name
    while len(readers.get(tensor, [])) == 1:
        node = readers[tensor][0]
        others = [i for i in node.input if i != tensor]
        if op_id(node) in ("Mul", "Div", "Add", "Sub") and len(others) == 1:
            value = constant(others[0])
            if value is None or (op_id(node) in ("Div", "Sub") and node.input[0] != tensor):
                break
            front.append((node.op_type, value))
        elif op_id(node) not in ("Identity", "Cast", "Transpose"):
            break
        tensor = node.output[0]
    return front


def input_scale(graph: onnx.GraphProto, name: str) -> float:
    """The factor by which the graph scales its input itself (`_scale_of` its front)."""
    return _scale_of(_input_front(graph, name))


def _scale_of(front: list[tuple[str, np.ndarray]]) -> float:
    """A scalar Mul or Div of a graph's front (`_input_front`). Of several, the one that
    scales 0..255 pixels (`is_pixel_scale`): Keras' Rescaling(1/255) may come before or after
    a Normalization, whose Sub and Div (or Mul by 1/std) are per-channel, or scalar for one
    channel; else the first. 1 when there is none (Rescaling(1/127.5, offset=-1) is a Mul and
    an Add)."""
    factors = []
    for op, value in front:
        if op in ("Mul", "Div") and value.size == 1:
            factor = float(value.reshape(-1)[0])
            factors.append(factor if op == "Mul" else 1 / factor if factor else 1.0)
    return next((f for f in factors if is_pixel_scale(f)), factors[0] if factors else 1.0)


# A mean above this, subtracted from the input before any scaling, is in 0..255 units.
PIXEL_MEAN_ABOVE = 2.0


def raw_pixels(graph: onnx.GraphProto, name: str) -> str | None:
    """How the graph shows that it takes pixels in 0..255, in words, or None: it scales its
    input by about 1/255 itself (`input_scale`), or it first subtracts a mean in 0..255 units
    (Keras' Normalization adapted on raw pixels, as keras.applications' ConvNeXt has it)."""
    front = _input_front(graph, name)
    scale = _scale_of(front)
    if is_pixel_scale(scale):
        return f"the model scales its input by {scale:.4g} itself"
    for op, value in front:
        if op in ("Mul", "Div"):
            break
        mean = value if op == "Sub" else -value
        if value.size and np.all(mean > PIXEL_MEAN_ABOVE):
            shown = ", ".join(f"{m:.4g}" for m in np.unique(mean.reshape(-1))[:3])
            return f"the model subtracts a mean of {shown} itself"
    return None


def input_layout(graph: onnx.GraphProto, name: str) -> str:
    """NHWC when the input only feeds Transposes to NCHW (how tf2onnx writes Keras models),
    directly or through element-wise ops with constants, or a Pad (which keeps every axis
    where it is: tf2onnx without its optimiser pads H and W before the Transpose): the data
    is fed so, and the input's channels are its last axis."""
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if op_id(n) == "Constant" for o in n.output}
    constants |= {o for o, source in identity_sources(graph).items() if source in constants}
    readers = tensor_readers(graph)
    ends, stack, seen = [], [name], {name}
    while stack:
        tensor = stack.pop()
        for node in readers.get(tensor, []):
            others = [i for i in node.input if i and i != tensor]
            keeps_axes = op_id(node) == "Pad" and node.input[0] == tensor
            if keeps_axes or op_id(node) in ELEMENTWISE and all(i in constants for i in others):
                stack.extend(o for o in node.output[:1] if o not in seen)
                seen.update(node.output[:1])
            else:
                ends.append(node)
    perms = [list(attributes(n).get("perm", [])) for n in ends if op_id(n) == "Transpose"]
    if ends and len(perms) == len(ends) and all(p == [0, 3, 1, 2] for p in perms):
        return "NHWC"
    return "NCHW"

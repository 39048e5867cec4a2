"""What a parameter is: the float initializers that hold learned values, and their count.

`count_parameters` is the count docs/design.md budgets against; the PyTorch bridge reads the
same shape rule (`is_single_number`), so what is counted is what trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from itertools import chain

import numpy as np
import onnx
from onnx import numpy_helper

from .domains import op_id
from .graph import is_weight, nested_nodes, stored_casts, subgraphs
from .read import refuse_quantized

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
    dims: Sequence[int],
    constant: Callable[[str], np.ndarray | None] | None = None,
) -> bool:
    """Whether a float constant of shape `dims` read as input `position` of `node` is a
    learned value (`constant`: the value of a constant tensor by name, None if not one).

    BatchNorm statistics, Clip bounds, Resize scales, Pad values and Dropout's ratio are
    not; nor is a single number read by an element-wise op, whatever its rank
    (`is_single_number`: GELU's sqrt(2) and HardSwish's 1/6 as torch writes them, 0-d, or a
    Rescaling offset and a LayerNorm epsilon as tf2onnx writes them, (1, 1, 1, 1)); nor the
    scale and bias of an InstanceNormalization that are all ones and all zeros
    (`_no_affine`).
    """
    if position in NOT_PARAMETERS.get(op_id(node), ()):
        return False
    if op_id(node) == "InstanceNormalization" and position in (1, 2) and constant:
        return not _no_affine(node, constant)
    return not (is_single_number(dims) and op_id(node) in SCALAR_OPS)


def long_axes(dims: Sequence[int]) -> int:
    """How many axes are above 1: exporters store a per-channel vector as (C,), (C, 1, 1) or
    (1, C, 1, 1), so the rank alone does not tell a vector from a table."""
    return sum(d > 1 for d in dims)


def is_single_number(dims: Sequence[int]) -> bool:
    """No axis above 1: one number, stored 0-d or (1, 1, 1, 1). Read by an element-wise op it
    is a constant, neither counted (`is_parameter_use`) nor trained (the bridge's
    `is_per_channel`), so what is counted is what trains."""
    return long_axes(dims) == 0


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
    constant = _constants(floats, stored)
    read: set[str] = set()
    learned: set[str] = set()
    own = (
        (node, k, name)
        for node in model.graph.node
        if not (node.output and node.output[0] in stored)
        for k, name in enumerate(node.input)
    )
    for node, k, name in chain(own, _outer_reads(model.graph)):
        name = stored.get(name, name)
        if name in floats:
            read.add(name)
            if is_parameter_use(node, k, floats[name].dims, constant):
                learned.add(name)
    sizes = {
        name: math.prod(t.dims) for name, t in floats.items() if name in learned or name not in read
    }
    return sizes | _nested_parameter_sizes(model.graph)


def _outer_reads(
    graph: onnx.GraphProto, local: frozenset[str] = frozenset()
) -> Iterator[tuple[onnx.NodeProto, int, str]]:
    """(reader, position, name) for each input of a node inside `graph`'s subgraphs that names
    a value of `graph`'s scope (an If branch reading the main graph's InstanceNormalization
    scale): read there as much as by a node of `graph`. `local`: names the subgraphs between
    define, which hide `graph`'s."""
    for node in graph.node:
        for inner in subgraphs(node):
            defined = {v.name for v in inner.input} | {t.name for t in inner.initializer}
            defined |= {name for reader in inner.node for name in reader.output}
            hidden = local | defined
            for reader in inner.node:
                for k, name in enumerate(reader.input):
                    if name and name not in hidden:
                        yield reader, k, name
            yield from _outer_reads(inner, hidden)


def _constants(
    floats: dict[str, onnx.TensorProto], stored: dict[str, str]
) -> Callable[[str], np.ndarray | None]:
    """The value of a float initializer of `floats` by name, read through the Casts of
    `stored` (Cast output -> stored weight); None for any other tensor: what
    `is_parameter_use` reads (an InstanceNormalization's ones and zeros)."""

    def constant(name: str) -> np.ndarray | None:
        name = stored.get(name, name)
        return numpy_helper.to_array(floats[name]) if name in floats else None

    return constant


def _nested_parameter_sizes(graph: onnx.GraphProto) -> dict[str, int]:
    """The float weights the subgraphs of `graph`'s nodes hold (an If branch's own conv
    weight), each under "k:node/graph/name", k numbering the subgraphs (a subgraph may reuse
    an outer name; node and graph names may be empty or alike): learned values as much as the
    main graph's are, however the branch taken reads them."""
    sizes: dict[str, int] = {}
    inners = ((node, inner) for node in nested_nodes(graph) for inner in subgraphs(node))
    for k, (node, inner) in enumerate(inners):
        floats = {t.name: t for t in inner.initializer if is_weight(t)}
        constant = _constants(floats, {})  # the branch's own ones and zeros, as above
        uses: dict[str, list[bool]] = {name: [] for name in floats}
        for reader in nested_nodes(inner):
            for position, name in enumerate(reader.input):
                if name in floats:
                    dims = floats[name].dims
                    uses[name].append(is_parameter_use(reader, position, dims, constant))
        for name, t in floats.items():
            if not uses[name] or any(uses[name]):  # learned unless read otherwise, as above
                sizes[f"{k}:{node.name}/{inner.name}/{name}"] = math.prod(t.dims)
    return sizes


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of the float initializers that hold learned values (`parameter_sizes`): the
    parameter count docs/design.md budgets against. Each tensor counts once, however many
    nodes read it: what the file holds (a tensor shared by two layers, as torch counts a tied
    weight; where an exporter merged equal tensors of several layers, such as the all-ones
    scales of untrained BNs, that is fewer than the torch module's `parameters()`).
    A quantized graph is refused as `load` refuses it (QuantizedModelError): its weights are
    no float initializers, and its float scales are no count of them.
    """
    refuse_quantized(model)
    return sum(parameter_sizes(model).values())

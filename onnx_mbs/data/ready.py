"""Model-ready data: an .npz whose arrays are named after the model's inputs.

Each array holds one input for every sample (its first axis counts samples) and is
fed as it is: no resizing, scaling or normalising. This is how models whose input is
not an image (audio on (N, 1, samples), video on (N, C, T, H, W)), models with
several inputs (an image and a scale) and users with calibration tensors already
preprocessed give data. The arrays are checked against the declared inputs: same
rank, same fixed dims after the first, same element type, same number of samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from onnx_mbs.passes.errors import BadInputError

IMAGE_ARRAY = "x"  # the image npz's array name (labels: LABELS)
LABELS = "y"


@dataclass(frozen=True)
class DeclaredInput:
    """One graph input as the model declares it: dims (None where not fixed) and type."""

    name: str
    dims: tuple[int | None, ...]
    dtype: np.dtype | None  # None for an element type numpy cannot hold


def declared_inputs(model: onnx.ModelProto) -> list[DeclaredInput]:
    """The graph inputs data must feed (initializers listed as inputs aside), in order."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        tensor_type = graph_input.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim
        )
        inputs.append(DeclaredInput(graph_input.name, dims, numpy_type(tensor_type.elem_type)))
    return inputs


def numpy_type(elem_type: int) -> np.dtype | None:
    """numpy's type for an ONNX element type (None for one numpy cannot hold)."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return None


def takes_floats(dtype: np.dtype | None) -> bool:
    """Whether a model input of type `dtype` takes what image data is fed as: float, half
    or double (bfloat16 and the float8 types are no numpy floats)."""
    return dtype is not None and np.issubdtype(dtype, np.floating)


def fed_type(dtype: np.dtype | None) -> np.dtype | None:
    """How an input of type `dtype` is fed where that matters: an integer or bool input
    (uint8 pixels its graph converts itself: model-ready data) in its own type; None for a
    float input of any width (or none known), fed the data's floats."""
    return dtype if dtype is not None and dtype.kind in "iub" else None


def check_teacher_input(model: np.dtype | None, teacher: np.dtype | None) -> None:
    """Refuse a teacher whose input (of type `teacher`) is fed otherwise than the model's
    (`model`; `fed_type`): the teacher is fed the model's data as it is (retrain, eval
    --teacher), so uint8 pixels would reach a float teacher uncast, or floats a uint8 one
    cut, agreeing only where the other graph does nothing but that Cast."""
    fed = [fed_type(teacher), fed_type(model)]
    if fed[0] != fed[1]:
        kinds = ["float" if t is None else str(t) for t in fed]
        raise BadInputError(
            f"the teacher's input takes {kinds[0]}, the model's {kinds[1]}: the teacher is "
            "fed the model's data as it is; give a teacher with the model's input type"
        )


def is_model_ready(names: Sequence[str], inputs: Sequence[DeclaredInput]) -> bool:
    """Whether an npz holding arrays `names` is model-ready data for `inputs`: it names
    every input. An npz for a single 4-D float input named `x` stays image data (the image
    npz convention), preprocessed as before."""
    if not inputs or any(i.name not in names for i in inputs):
        return False
    return not reads_x_as_images(inputs)


def reads_x_as_images(inputs: Sequence[DeclaredInput]) -> bool:
    """Whether the model's only input is 4-D, named `x` and not of a numpy integer type: an
    npz x is image data for it. Images are fed as floats, so for a uint8 input it is
    model-ready (float types numpy holds only through ml_dtypes, bfloat16: images as before)."""
    if len(inputs) != 1:
        return False
    (only,) = inputs
    return only.name == IMAGE_ARRAY and len(only.dims) == 4 and fed_type(only.dtype) is None


def model_ready_arrays(
    npz: Mapping[str, np.ndarray], inputs: Sequence[DeclaredInput], what: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The arrays to feed, by input name, checked against `inputs`; and the labels
    (array `y`, when no input has that name), unchecked."""
    arrays: dict[str, np.ndarray] = {}
    count = None
    for declared in inputs:
        if not declared.dims:
            raise BadInputError(
                f"{what}: input {declared.name!r} is a scalar (rank 0): it has no first axis "
                "to give one entry per sample on, so model-ready data cannot feed it; export "
                "it with a batch axis, (N,) or (N, 1)"
            )
        array = npz[declared.name]
        _check(array, declared, what)
        if count is not None and len(array) != count:
            raise BadInputError(
                f"{what}: array {declared.name!r} has {len(array)} samples, "
                f"{inputs[0].name!r} has {count}; every input needs one entry per sample"
            )
        count = len(array)
        arrays[declared.name] = array
    if not count:
        raise BadInputError(f"{what} has no samples")
    names = {i.name for i in inputs}
    labels = npz[LABELS] if LABELS in npz and LABELS not in names else None
    return arrays, labels


def _check(array: np.ndarray, declared: DeclaredInput, what: str) -> None:
    expected = "(" + ", ".join("N" if k == 0 else str(d or "?") for k, d in
                               enumerate(declared.dims)) + ")"  # fmt: skip
    fits = array.ndim == len(declared.dims) and all(
        d is None or d == s for d, s in zip(declared.dims[1:], array.shape[1:])
    )
    if not fits:
        raise BadInputError(
            f"{what}: array {declared.name!r} has shape {array.shape}; the model input "
            f"expects {expected} (first axis: samples); model-ready data is fed as it is"
        )
    if declared.dtype is None or array.dtype != declared.dtype:
        wanted = declared.dtype if declared.dtype is not None else "a type numpy cannot hold"
        raise BadInputError(
            f"{what}: array {declared.name!r} has dtype {array.dtype}; the model input "
            f"expects {wanted} (model-ready data is fed as it is: store it as {wanted})"
        )

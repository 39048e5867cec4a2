"""Data fitted to a model: its single input's name, shape and layout (NCHW, or NHWC as
tf2onnx writes Keras models), normalisation from its metadata, labels checked against its
classes, or model-ready data for all its inputs; and how a run describes the data it used.
"""

from __future__ import annotations

import os
from typing import Any

import onnx

from onnx_mbs.data.ready import declared_inputs, takes_floats
from onnx_mbs.data.sources import DataSource, source_name
from onnx_mbs.data.spec import open_data
from onnx_mbs.logits import (
    check_label_range,
    check_none_unambiguous,
    choose_logits,
    classes_of,
    declared_shapes,
)
from onnx_mbs.memory import check_model_fits
from onnx_mbs.passes.errors import BadInputError, option
from onnx_mbs.passes.graph import input_layout, raw_pixels


def model_input(model: onnx.ModelProto) -> tuple[str, list[int]]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise BadInputError(
            f"the model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); give "
            "an .npz with one array per input, named after it (model-ready data, fed as it is)"
        )
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    return inputs[0].name, dims


def metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def open_for_model(
    spec: Any,
    model: onnx.ModelProto,
    *,
    mean: Any = None,
    std: Any = None,
    limit: int | None = None,
    split: str | None = "test",
    labels: bool = True,
    logits: str | None = None,
) -> DataSource:
    """A DataSource fitted to `model`'s (single, fixed) input, NCHW or NHWC as the graph
    reads it; mean/std default to its metadata; `split` is the default IDX split; `labels`
    False: the labels are neither read nor checked; `logits`: the output whose classes they
    name. Model-ready data (an npz with an array per input) feeds every input as it is, several
    included. The largest tensor a sample makes must fit in memory before any sample is read."""
    inputs = declared_inputs(model)
    is_path = isinstance(spec, (str, os.PathLike))
    if is_path and len(inputs) > 1:  # open_data takes a model-ready npz or refuses
        # the batch's x: the first float input (the image, whatever its place), fed as float;
        # the others (an int64 image size) go beside it as they are
        primary = next((i for i in inputs if takes_floats(i.dtype)), inputs[0])
        name, shape = primary.name, [d or 0 for d in primary.dims]
    else:
        name, shape = model_input(model)
    check_model_fits(model)
    source = open_data(
        spec,
        name,
        shape,
        mean=mean,
        std=std,
        limit=limit,
        metadata=metadata(model),
        layout=input_layout(model.graph, name),
        raw_pixels=raw_pixels(model.graph, name),
        split=split,
        labels=labels,
        inputs=inputs,  # a path's model-ready arrays, a reader's input type
    )
    check_labels(source, model, logits)
    return source


def check_labels(source: DataSource, model: onnx.ModelProto, logits: str | None = None) -> None:
    """Labels must name one of the classes of the model's logits output (`onnx_mbs.logits`;
    `logits` names it), when the declared shapes tell which output that is and its classes.
    Otherwise `eval` and `retrain` check them once they have run the model."""
    labels = getattr(source, "labels", None)
    if labels is None or not len(labels):
        return
    shapes = declared_shapes(model)
    check_none_unambiguous(shapes, logits)
    if logits is not None and logits not in shapes:
        return  # refused, naming the outputs, where it is used
    name = logits or choose_logits(shapes, model, required=False)
    classes = classes_of(shapes[name]) if name is not None else None
    if classes is not None:
        check_label_range(labels, classes, name, source_name(source))


def data_text(source: DataSource | None, measured: list[str]) -> str:
    if source is None:
        give = f"give {option('--data')} to measure"
        return f"none: rho = 1 everywhere (MACs and receptive fields only; {give})"
    if not measured:
        return f"{source.description}; no Conv activations to measure: rho = 1 everywhere"
    return source.description


def preprocessing(source: DataSource | None) -> str:
    if source is None:
        return "none (no data)"
    return source.preprocess.describe() if source.preprocess else "none (model inputs as given)"


def has_labels(source: DataSource) -> bool:
    first = next(iter(source.batches(1)), None)
    return first is not None and first.y is not None

"""Export zoo (or any) PyTorch CNNs to ONNX in the two forms onnx-mbs reads.

"deploy": BatchNorm folded into the preceding Conv, as inference graphs ship.
"train":  BatchNormalization nodes kept (inference semantics, one output), so
          the bridge can retrain them.
Input is named "input", output "logits"; opset 17.

    python -m onnx_mbs.models.export resnet20 --form train -o resnet20.onnx
    python -m onnx_mbs.models.export --all out/zoo --form deploy
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import warnings
from pathlib import Path
from typing import Literal

import onnx
import torch
from torch import nn

from onnx_mbs.models.zoo import HEADS, ZOO, get_entry
from onnx_mbs.passes.errors import BadInputError

Form = Literal["deploy", "train"]
OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Return a copy whose BN statistics and affine parameters are random but tame.

    Identity BN (mean 0, var 1, gamma 1, beta 0) would make folding trivially
    right; these values make a folding bug show in the outputs. The ranges keep
    activations from growing layer after layer in deep residual nets.
    """
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                m.running_var.copy_(1.0 + 1.5 * torch.rand(c, generator=gen))
                m.weight.copy_(0.4 + 0.6 * torch.rand(c, generator=gen))
                m.bias.copy_(0.1 * torch.randn(c, generator=gen))
    return model


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...],
    path: str | Path | None = None,
    form: Form = "deploy",
    dynamic_batch: bool = False,
    output_names: tuple[str, ...] = (OUTPUT_NAME,),
    opset: int = OPSET,
    dynamic_size: bool = False,
) -> onnx.ModelProto:
    """Export `model` (in eval mode; the caller's module is not changed) and return the ONNX model.

    `dynamic_batch` makes the batch dim dynamic, `dynamic_size` the dims after the channels
    (height and width), as `yolo export dynamic=True` and most detector exports do.

    The legacy exporter folds Conv+BN in its eval-mode peephole pass; exporting
    with TrainingMode.PRESERVE on an eval-mode module skips that pass, so BN
    stays as an inference BatchNormalization node.
    """
    if form not in ("deploy", "train"):
        raise BadInputError(f"form must be 'deploy' or 'train', got {form!r}")
    model = copy.deepcopy(model).eval()
    training = (
        torch.onnx.TrainingMode.EVAL if form == "deploy" else torch.onnx.TrainingMode.PRESERVE
    )
    dynamic_axes: dict[str, dict[int, str]] = {
        name: {0: "batch"} for name in (INPUT_NAME, *output_names) if dynamic_batch
    }
    if dynamic_size:
        names = ["height", "width"] if len(input_shape) == 4 else None
        dynamic_axes.setdefault(INPUT_NAME, {}).update(
            {k: names[k - 2] if names else f"size{k}" for k in range(2, len(input_shape))}
        )
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # PRESERVE + constant folding warns for modules in training mode; ours is in eval mode.
        warnings.filterwarnings("ignore", message="It is recommended that constant folding")
        # The legacy (TorchScript) exporter is chosen on purpose: fast, and it folds BN.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(input_shape),),
            buffer,
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            opset_version=opset,
            training=training,
            do_constant_folding=True,
            dynamic_axes=dynamic_axes or None,
            keep_initializers_as_inputs=True,
            dynamo=False,
        )
    proto = _initializers_not_inputs(onnx.load_from_string(buffer.getvalue()))
    if path is not None:
        onnx.save(proto, str(path))
    return proto


def _initializers_not_inputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers from the graph inputs (edits and returns `proto`, which we own).

    Exporting with keep_initializers_as_inputs=True skips the exporter's
    deduplication of equal initializers, which would otherwise turn one of two
    equal tensors (e.g. the two BN biases of a residual Add after training) into
    an Identity node; every weight stays its own initializer.
    """
    weights = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in weights]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    return proto


def export_head_model(
    name: str,
    form: Form = "deploy",
    seed: int = 0,
    dynamic_batch: bool = True,
    calibration: torch.Tensor | None = None,
) -> onnx.ModelProto:
    """Export detection/dense-map zoo graph `name` (`zoo.HEADS`) with seeded random weights.

    With `calibration` images, BN statistics are measured on them (as training would have left
    them) instead of randomized: a graph whose BN statistics match its data behaves alike in
    train and eval mode, as a trained one does.
    """
    entry = HEADS[name]
    torch.manual_seed(seed)
    model = entry.build()
    if calibration is None:
        model = randomize_batchnorm(model, seed)
    else:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # the plain average over the batches
        with torch.no_grad():
            model.train()
            for batch in calibration.split(32):
                model(batch)
    return export_onnx(model.eval(), entry.input_shape, None, form, dynamic_batch, entry.outputs)


def build_zoo_model(name: str, seed: int = 0) -> nn.Module:
    """Zoo model `name`, seeded random weights, non-trivial BN: what `export_zoo` exports."""
    entry = get_entry(name)
    torch.manual_seed(seed)
    return randomize_batchnorm(entry.build(), seed).eval()


def export_zoo(
    name: str,
    form: Form = "deploy",
    input_shape: tuple[int, int, int, int] | None = None,
    seed: int = 0,
    path: str | Path | None = None,
) -> onnx.ModelProto:
    """Export zoo model `name` as built by `build_zoo_model(name, seed)`."""
    entry = get_entry(name)
    model = build_zoo_model(name, seed)
    return export_onnx(model, input_shape or entry.input_shape, path, form)


def _parse_shape(text: str) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise BadInputError(
            f"--input-shape wants four positive integers like 1,3,32,32; got {text}"
        )
    return shape  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m onnx_mbs.models.export", description="Export zoo models to ONNX."
    )
    parser.add_argument("name", nargs="?", help=f"zoo model: {', '.join(ZOO)}")
    parser.add_argument("--all", metavar="DIR", help="export every zoo model into DIR")
    parser.add_argument("--form", choices=["deploy", "train"], default="deploy")
    parser.add_argument("-o", "--output", help="output file (default NAME.FORM.onnx)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input-shape", help="N,C,H,W (default: the model's full input shape)")
    parser.add_argument(
        "--test-shape", action="store_true", help="use the cheaper test input shape"
    )
    args = parser.parse_args(argv)
    try:
        if bool(args.name) == bool(args.all):
            raise BadInputError("give either a model NAME or --all DIR")
        if args.all and args.output:
            raise BadInputError("-o cannot be used with --all (files are named NAME.FORM.onnx)")
        names = list(ZOO) if args.all else [args.name]
        folder = Path(args.all or ".")
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            entry = get_entry(name)
            if args.input_shape:
                shape = _parse_shape(args.input_shape)
            else:
                shape = entry.test_input_shape if args.test_shape else entry.input_shape
            out = Path(args.output) if args.output else folder / f"{name}.{args.form}.onnx"
            export_zoo(name, args.form, shape, args.seed, out)
            print(f"{name}: {args.form} form, input {shape} -> {out}")
    except BadInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

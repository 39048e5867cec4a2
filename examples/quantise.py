"""Quantise an ONNX model with onnxruntime's static quantisation, calibrated on a --data spec.

    python examples/quantise.py small.onnx small.int8.onnx --data calib.npz

The calibration samples are read and preprocessed as onnx-mbs reads them
(`onnx_mbs.calibration.CalibrationReader`: the model's recorded mean/std), so
quantise after `reduce` (and `retrain`), then `onnx-mbs eval` the int8 model.
"""

from __future__ import annotations

import argparse
import sys

from onnxruntime.quantization import QuantFormat, quantize_static

from onnx_mbs.calibration import CalibrationReader
from onnx_mbs.passes import BadInputError, parse_input_shape
from onnx_mbs.save import check_outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="float ONNX model")
    parser.add_argument("output", help="where to write the quantised model")
    parser.add_argument("--data", required=True, help="calibration data (an onnx-mbs --data spec)")
    parser.add_argument("--limit", type=int, default=512, help="calibration samples (default: 512)")
    parser.add_argument(
        "--format", choices=["QDQ", "QOperator"], default="QDQ", help="(default: QDQ)"
    )
    parser.add_argument("--per-channel", action="store_true", help="per-channel weight scales")
    parser.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME:D0,D1,...",
        help="the size to calibrate at, for an input whose H, W are dynamic",
    )
    args = parser.parse_args(argv)
    try:  # the output never replaces what the run reads; bad input: one line, exit 2
        check_outputs(
            args.output, models={"the input model": args.model}, data={"--data": args.data}
        )
        shapes = dict(parse_input_shape(spec) for spec in args.input_shape or [])
        reader = CalibrationReader(args.data, args.model, limit=args.limit, input_shapes=shapes)
    except BadInputError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    quantize_static(
        args.model,
        args.output,
        reader,
        quant_format=QuantFormat[args.format],
        per_channel=args.per_channel,
    )
    print(f"wrote {args.output} ({args.format}, calibrated on {len(reader.source)} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

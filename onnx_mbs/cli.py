"""The `onnx-mbs` command: thin argument parsing over the Python API.

Exit codes: 0 done, 2 bad input (one line on stderr), 1 a bug (traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from onnx_mbs.passes import BadInputError, analyze_model, load_model, parse_input_shape


def _input_shapes(specs: Sequence[str] | None) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, dims = parse_input_shape(spec)
        shapes[name] = dims
    return shapes


def _fmt_int(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (first column left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def cmd_analyze(args: argparse.Namespace) -> int:
    model = load_model(args.model, _input_shapes(args.input_shape))
    analysis = analyze_model(model)
    if args.json:
        json.dump(analysis.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    rows = [
        (
            m.index,
            f"{m.resolution[0]}x{m.resolution[1]}",
            len(m.layers),
            len(m.base_layers),
            _fmt_int(m.params),
            _fmt_int(m.macs),
        )
        for m in analysis.macroblocks
    ]
    print(format_table(["macroblock", "resolution", "layers", "base", "params", "MACs"], rows))
    print(
        f"\ntotal: {_fmt_int(analysis.total_params)} params, {_fmt_int(analysis.total_macs)} MACs "
        f"({len(analysis.layers)} conv layers; totals include the head)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-mbs",
        description="Macroblock Scaling for ONNX CNNs: ONNX in, smaller ONNX out.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def add_input_shape(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--input-shape",
            action="append",
            metavar="NAME:DIMS",
            help="fix a dynamic input shape, e.g. input:1,3,224,224 (repeatable)",
        )

    p = sub.add_parser("analyze", help="macroblocks, receptive fields, params and MACs")
    p.add_argument("model", help="ONNX model file")
    add_input_shape(p)
    p.add_argument("--json", action="store_true", help="print a JSON document on stdout")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BadInputError as e:
        print(f"onnx-mbs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx-mbs: interrupted", file=sys.stderr)
        return 130

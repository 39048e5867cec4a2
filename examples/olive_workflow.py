"""An Olive workflow that reduces the bundled model with MBS, then quantises it (int8 QDQ).

    python examples/olive_workflow.py --output out/olive

writes DIR/reduced/model.onnx (MBS, half the parameters) and DIR/int8/model.onnx
(that model after Olive's OnnxStaticQuantization, calibrated on the same data).
The MBS pass is registered through Olive's package config
(`onnx_mbs.interop.olive.package_config()`); calibration data for both passes is
the bundled Fashion-MNIST sample, read by onnx-mbs's own loader (the dataset
`onnx_mbs_data`), with the preprocessing recorded in the model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # read when Olive is imported

# Before Olive: it imports torchvision, which needs onnx_mbs's CPU-torch helper here.
from onnx_mbs.interop.olive import DATASET_NAME, PASS_NAME, package_config  # noqa: E402
from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE  # noqa: E402


def workflow(
    model: Path, data: Path, budget: str, passes: list[str], output: Path, cache: Path
) -> dict:
    """The Olive run config of `passes` (of "mbs" and "int8", in that order)."""
    calibration = {
        "name": "calibration",
        "type": "DataContainer",
        "load_dataset_config": {
            "type": DATASET_NAME,
            "params": {"data": str(data), "model_path": str(model)},
        },
    }
    known = {
        "mbs": {"type": PASS_NAME, "data": str(data), "budget": budget},
        "int8": {
            "type": "OnnxStaticQuantization",
            "data_config": "calibration",
            "quant_format": "QDQ",
            "per_channel": True,
        },
    }
    return {
        "input_model": {"type": "ONNXModel", "model_path": str(model)},
        "data_configs": [calibration],
        "passes": {name: known[name] for name in passes},
        "output_dir": str(output),
        "cache_dir": str(cache),
        "log_severity_level": 3,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, type=Path, help="folder to write into")
    parser.add_argument("--budget", default="params=0.5", help="MBS budget (default: %(default)s)")
    args = parser.parse_args(argv)
    from olive.workflows import run

    # Two runs sharing one cache: the second takes the reduced model from it and quantises.
    with tempfile.TemporaryDirectory(prefix="olive-cache-") as cache:
        for passes, folder in ((["mbs"], "reduced"), (["mbs", "int8"], "int8")):
            config = workflow(
                BUNDLED_MODEL, FMNIST_SAMPLE, args.budget, passes, args.output / folder, Path(cache)
            )
            run(config, package_config=package_config())
    for path in sorted(args.output.rglob("*.onnx")):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

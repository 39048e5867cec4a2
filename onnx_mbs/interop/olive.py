"""MBS as a Microsoft Olive pass: a workflow reduces the model, then quantises it.

Olive finds passes through its package config; `package_config()` is Olive's own
with `MacroblockScaling` added, so every built-in pass stays available:

    from olive.workflows import run
    from onnx_mbs.interop.olive import package_config

    run({"input_model": {"type": "ONNXModel", "model_path": "model.onnx"},
         "passes": {"mbs": {"type": "MacroblockScaling", "data": "calib/",
                            "budget": "params=0.5"},
                    "int8": {"type": "OnnxStaticQuantization", ...}},
         "output_dir": "out"},
        package_config=package_config())

The pass's options are `onnx_mbs.reduce`'s, with its defaults (`data` is a --data
spec: image folder, .npz or IDX folder); the model file is read as `reduce` reads
it, external data included. The ReduceReport of the last run in the process is kept in
`MacroblockScaling.last_report` (None after a run that failed); a pass object's own
`last_report` is its own last run's.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any, ClassVar

from onnx_mbs.models.torchvision_cpu import import_torchvision

from . import missing

# The packages whose absence is not olive-ai's (keyed by module): (package, extra).
_INSTALLED_BY = {"torch": ("torch", "torch"), "requests": ("requests", "olive")}


def _torchvision_where_installed() -> None:
    """Olive imports torchmetrics, which imports torchvision where it is installed (and
    fails on the CUDA one beside the CPU torch: `import_torchvision`); no dependency of
    Olive's, its absence is no refusal."""
    try:
        import_torchvision()
    except ModuleNotFoundError as error:
        if error.name != "torchvision":
            raise


def _missing(error: Exception) -> ImportError:
    """The refusal naming what is missing: torch (which olive-ai asks for unpinned, so the
    torch extra installs it first), requests, else olive-ai (or one of its dependencies)."""
    module = (getattr(error, "name", None) or "").partition(".")[0]
    package, extra = _INSTALLED_BY.get(module, ("olive-ai", "olive"))
    return missing(package, error, extra=extra)


try:
    _torchvision_where_installed()
    from olive.data.registry import Registry
    from olive.hardware import AcceleratorSpec
    from olive.model import ONNXModelHandler
    from olive.model.utils import resolve_onnx_path
    from olive.package_config import OlivePackageConfig
    from olive.passes.olive_pass import Pass
    from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
    from olive.passes.pass_config import BasePassConfig, PassConfigParam
except Exception as e:  # pragma: no cover - depends on the environment; a broken
    # install raises other errors than ImportError (onnx-graphsurgeon 0.5.5 under onnx 1.23)
    raise _missing(e) from None

PASS_NAME = "MacroblockScaling"
DATASET_NAME = "onnx_mbs_data"

# ReduceOptions as Olive config parameters: (type, description); defaults are ReduceOptions'.
OPTIONS: dict[str, tuple[Any, str]] = {
    "data": (str | None, "calibration data: image folder, .npz (x, y) or IDX folder"),
    "budget": (str | None, "fraction to keep: params=F, flops=F, latency=F (commas: all)"),
    "width_map": (str, "beta from redundancy R: linear:C or power:GAMMA"),
    "receptive_field": (str, "global or local"),
    "strategy": (str, "mbs, uniform or global"),
    "providers": (str, "onnxruntime providers for the statistics: auto, cpu or cuda"),
    "input_shapes": (dict[str, list[int]] | None, "fixed shapes of dynamic inputs"),
    "channel_multiple": (int | str, "kept channel counts are multiples of this, or auto"),
    "beta_min": (float, "smallest width scale"),
    "importance": (str, "which channels a group keeps: auto, act, l1, l2 or bn"),
    "mean": (list[float] | None, "per-channel mean after /255 (default: model metadata)"),
    "std": (list[float] | None, "per-channel std (default: model metadata)"),
    "limit": (int | None, "use the first N samples of data"),
    "batch_size": (int, "statistics batch size"),
}


def _defaults() -> dict[str, Any]:
    from onnx_mbs.options import ReduceOptions

    return {"data": None, **{f.name: f.default for f in fields(ReduceOptions) if f.name in OPTIONS}}


class MacroblockScaling(Pass):
    """Reduce an ONNX model's Conv widths with MBS (onnx_mbs.reduce)."""

    # Olive makes the pass objects of a workflow: the class holds the report of the last run
    # in this process (None while one runs, and after one that failed); each pass object
    # holds its own run's.
    last_report: ClassVar[Any] = None

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        defaults = _defaults()
        config = {
            name: PassConfigParam(type_=kind, default_value=defaults[name], description=text)
            for name, (kind, text) in OPTIONS.items()
        }
        config.update(get_external_data_config())
        return config

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        from onnx_mbs.pipeline import reduce

        options = {name: getattr(config, name) for name in OPTIONS}
        type(self).last_report = None  # a failed run must not leave the one before it
        vars(self)["last_report"] = None
        reduced, report = reduce(
            model.model_path, evaluate_accuracy=False, progress=False, **options
        )
        type(self).last_report = vars(self)["last_report"] = report
        return model_proto_to_olive_model(reduced, resolve_onnx_path(output_model_path), config)


@Registry.register_dataset(DATASET_NAME)
def onnx_mbs_data(
    data: str,
    model_path: str,
    limit: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    input_shapes: dict[str, list[int]] | None = None,
) -> list[tuple[dict[str, Any], int]]:
    """A --data spec as an Olive dataset of ({input: sample}, label) pairs, preprocessed for
    the model at `model_path` as `onnx-mbs` does (mean/std default to its metadata; images
    read at `input_shapes` where its H, W are dynamic): what a workflow's quantisation
    calibrates on after MBS reduced on the same data."""
    import torch

    from onnx_mbs.calibration import CalibrationReader

    reader = CalibrationReader(
        data, model_path, limit=limit, mean=mean, std=std, input_shapes=input_shapes
    )
    source = reader.source
    samples = []
    for batch in source.batches(256):
        labels = [-1] * len(batch.x) if batch.y is None else batch.y.tolist()
        samples += [
            ({source.input_name: torch.from_numpy(x)}, label) for x, label in zip(batch.x, labels)
        ]
    return samples


def package_config() -> dict[str, Any]:
    """Olive's package config with `MacroblockScaling` registered: pass it as
    `olive.workflows.run(..., package_config=package_config())`."""
    with open(OlivePackageConfig.get_default_config_path()) as f:
        config = json.load(f)
    config["passes"][PASS_NAME] = {
        "module_path": f"{__name__}.{MacroblockScaling.__name__}",
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
    }
    return config

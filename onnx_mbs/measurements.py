"""What a model's metadata says about its own weights, which a changed model must not inherit.

Models trained by this project (models/train.py) record their test top-1 and how they were
trained (`onnx_mbs.test_top1`, `onnx_mbs.train`). A reduced, retrained or recalibrated model
has other weights: carried over, those figures would describe it wrongly, in every tool that
shows a model's metadata. A reduction that cuts nothing (and records no other mean/std)
writes the same weights back: its model keeps them. The preprocessing (`onnx_mbs.mean`,
`onnx_mbs.std`) and names stay: they describe the data, not the weights.
"""

from __future__ import annotations

import onnx

MEASURED_KEYS = ("onnx_mbs.test_top1", "onnx_mbs.train")


def drop_measurements(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, in place, without the metadata that measured the weights it came from."""
    kept = [p for p in model.metadata_props if p.key not in MEASURED_KEYS]
    if len(kept) != len(model.metadata_props):
        del model.metadata_props[:]
        model.metadata_props.extend(kept)
    return model

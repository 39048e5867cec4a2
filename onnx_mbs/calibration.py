"""--data as onnxruntime's quantisation reads calibration data, for quantising after reduction.

    from onnxruntime.quantization import QuantFormat, quantize_static
    from onnx_mbs.calibration import CalibrationReader

    quantize_static("small.onnx", "small.int8.onnx",
                    CalibrationReader("calib.npz", "small.onnx"), quant_format=QuantFormat.QDQ)

The samples are preprocessed as every onnx-mbs command does (resize, channels, the
mean/std recorded in the model's metadata unless given), so the quantised model is
calibrated on what it will see. Model-ready data feeds every input it holds; a model that
fixes its batch gets batches of that size, the last padded by repeating its last sample
(onnxruntime cannot run it on another); `samples` says where the padding starts.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader

from onnx_mbs.data import batch_inputs
from onnx_mbs.data.fit import open_for_model
from onnx_mbs.passes import FixInputShapes
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.passes.load import analysis_shapes, read_model, static_batch
from onnx_mbs.passes.shapes import InputShapes
from onnx_mbs.runtime import pad_rows

DEFAULT_BATCH = 64


class CalibrationReader(CalibrationDataReader):
    """Input dicts of `batch_size` preprocessed samples of `data` (a --data spec) for `model`
    (default: the batch the model fixes, else 64; `input_shapes`: the size to read images at
    where the model's H, W are dynamic); `rewind()` starts again (onnxruntime's calibrators
    may read twice)."""

    def __init__(
        self,
        data: Any,
        model: str | os.PathLike | onnx.ModelProto,
        batch_size: int | None = None,
        limit: int | None = None,
        mean: Any = None,
        std: Any = None,
        input_shapes: InputShapes | None = None,
    ) -> None:
        read = read_model(model)
        self.fixed = static_batch(read)
        if batch_size is not None and self.fixed and batch_size != self.fixed:
            raise BadInputError(
                f"the model fixes its batch at {self.fixed}; batch_size={batch_size} cannot run "
                "on it: leave batch_size out"
            )
        # Dynamic H, W (kept by reduce) are read at the given size, or the recorded imgsz.
        if shapes := analysis_shapes(read, input_shapes):
            read = FixInputShapes(shapes, batch=None)(read).model
        self.source = open_for_model(data, read, mean=mean, std=std, limit=limit, split="train")
        self.batch_size = self.fixed or batch_size or DEFAULT_BATCH
        self._batches: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self.rewind()
        return next(self._batches, None)

    def rewind(self) -> None:
        name = self.source.input_name
        self._batches = (
            {key: pad_rows(array, self.fixed) for key, array in batch_inputs(b, name).items()}
            for b in self.source.batches(self.batch_size)
        )

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch_size)

    @property
    def samples(self) -> int:
        """How many of the rows it gives are real samples: those past it pad the last batch.
        `reduce` reads its data up to here, so the copies are not measured as samples."""
        return len(self.source)

"""Calibration and training data: image folders, .npz, IDX folders and Python readers."""

from onnx_mbs.data.preprocess import Preprocess
from onnx_mbs.data.sources import Batch, DataSource, batch_inputs, to_arrays
from onnx_mbs.data.spec import open_data

__all__ = ["Batch", "DataSource", "Preprocess", "batch_inputs", "open_data", "to_arrays"]

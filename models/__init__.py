"""Model zoo: PyTorch CNN definitions (zoo), ONNX export (export), Fashion-MNIST training (train).

Small trained models and data samples live in bundled/. Importing this package
does not import torch; the submodules do.
"""

from pathlib import Path

BUNDLED_DIR = Path(__file__).parent / "bundled"
BUNDLED_MODEL = BUNDLED_DIR / "resnet20_fmnist.onnx"
FMNIST_SAMPLE = BUNDLED_DIR / "fmnist_sample.npz"
FMNIST_TRAIN_SAMPLE = BUNDLED_DIR / "fmnist_train_sample.npz"

"""Shared zoo fixtures: ONNX exports of zoo models (cached per session) and bundled files.

Other test files use `zoo_onnx(name, form)` to run a check on "every zoo
model in both forms"; parametrize over SMALL_ZOO for that, since ALL_ZOO
includes models too large to export in a test run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE, FMNIST_TRAIN_SAMPLE
from onnx_mbs.models.zoo import ZOO

ALL_ZOO: list[str] = list(ZOO)
SMALL_ZOO: list[str] = [name for name, entry in ZOO.items() if entry.small]
# ShuffleNet v1's grouped 1x1 convs (g = 3) keep whole conv-groups, and its channel shuffles
# tie every conv-group to the others: one channel unit, nothing can be cut (and reduce says
# so). Tests that cut channels parametrize over the rest.
REDUCIBLE_ZOO: list[str] = [name for name in SMALL_ZOO if name != "shufflenet_v1"]
FORMS: list[str] = ["deploy", "train"]


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    """The one .npz writer of the suite: `arrays` saved at `path`; the path as a str."""
    np.savez(path, **arrays)
    return str(path)


def random_images(
    n: int, c_h_w, seed: int = 0, labels: bool = True, classes: int = 10
) -> dict[str, np.ndarray]:
    """`x`: n random uint8 images of shape c_h_w; `y`: random labels below `classes`."""
    rng = np.random.default_rng(seed)
    arrays = {"x": rng.integers(0, 256, (n, *c_h_w), dtype=np.uint8)}
    if labels:
        arrays["y"] = rng.integers(0, classes, n, dtype=np.int64)
    return arrays


@pytest.fixture(scope="session")
def zoo_onnx() -> Callable[[str, str], onnx.ModelProto]:
    """`get(name, form="deploy")`: the zoo model exported at its test input shape, seed 0.

    Exports are cached for the session; each call returns a fresh copy, so a
    test that edits its model cannot disturb another.
    """
    from onnx_mbs.models.export import export_zoo

    cache: dict[tuple[str, str], onnx.ModelProto] = {}

    def get(name: str, form: str = "deploy") -> onnx.ModelProto:
        key = (name, form)
        if key not in cache:
            cache[key] = export_zoo(name, form, ZOO[name].test_input_shape)  # type: ignore[arg-type]
        copy = onnx.ModelProto()
        copy.CopyFrom(cache[key])
        return copy

    return get


@pytest.fixture(scope="session")
def bundled_model_path() -> Path:
    """The bundled ResNet-20 trained on Fashion-MNIST (train form, dynamic batch)."""
    return BUNDLED_MODEL


@pytest.fixture(scope="session")
def bundled_small(tmp_path_factory, bundled_model_path) -> Path:
    """The bundled model reduced to half its parameters (128 calibration images), saved once."""
    from onnx_mbs.pipeline import reduce
    from onnx_mbs.save import save_model

    small, _ = reduce(
        str(bundled_model_path),
        str(FMNIST_SAMPLE),
        budget="params=0.5",
        limit=128,
        evaluate_accuracy=False,
        progress=False,
    )
    return save_model(small, tmp_path_factory.mktemp("small") / "small.onnx")


@pytest.fixture(scope="session")
def bundled_external(tmp_path_factory, bundled_model_path) -> Path:
    """The bundled model as torch's exporter writes by default: every weight in an external
    data file beside it (`model.onnx.data`), in a folder of its own."""
    path = tmp_path_factory.mktemp("external") / "model.onnx"
    onnx.save(
        onnx.load(str(bundled_model_path)),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path


@pytest.fixture(scope="session")
def fmnist_sample() -> tuple[np.ndarray, np.ndarray]:
    """512 Fashion-MNIST test images: x uint8 (512,1,28,28) raw pixels, y int64."""
    with np.load(FMNIST_SAMPLE) as data:
        return data["x"], data["y"]


@pytest.fixture(scope="session")
def fmnist_train_sample() -> tuple[np.ndarray, np.ndarray]:
    """2048 Fashion-MNIST training images: x uint8 (2048,1,28,28) raw pixels, y int64."""
    with np.load(FMNIST_TRAIN_SAMPLE) as data:
        return data["x"], data["y"]

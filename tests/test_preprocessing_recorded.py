"""--mean/--std given to reduce travel with the written model: eval and retrain use them."""

from __future__ import annotations

import json

import onnx
import pytest
from conftest import random_images, write_npz

from onnx_mbs.cli import main
from onnx_mbs.models import FMNIST_SAMPLE, FMNIST_TRAIN_SAMPLE

MEAN, STD = "0.286041", "0.353024"  # the bundled model's training-set mean and std


@pytest.fixture(scope="module")
def plain(tmp_path_factory, bundled_model_path):
    """The bundled model without its recorded preprocessing, as most exports come."""
    model = onnx.load(str(bundled_model_path))
    kept = [p for p in model.metadata_props if p.key not in ("onnx_mbs.mean", "onnx_mbs.std")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    path = tmp_path_factory.mktemp("plain") / "plain.onnx"
    onnx.save(model, str(path))
    return path


def _metadata(path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def _top1(capsys, *args: str) -> tuple[float, str]:
    assert main(["eval", *args, "--data", str(FMNIST_SAMPLE), "--json"]) == 0
    out = capsys.readouterr()
    return json.loads(out.out)["top1"], out.err


def test_mean_std_recorded_by_reduce_and_used_by_eval_and_retrain(plain, tmp_path, capsys):
    small = tmp_path / "small.onnx"
    args = ["--data", str(FMNIST_SAMPLE), "--limit", "128", "--budget", "params=0.8"]
    assert main(["reduce", str(plain), "-o", str(small), *args, "--mean", MEAN, "--std", STD]) == 0
    assert "(as given)" in capsys.readouterr().err
    meta = _metadata(small)
    assert (float(meta["onnx_mbs.mean"]), float(meta["onnx_mbs.std"])) == (float(MEAN), float(STD))
    assert meta["onnx_mbs.dataset"] == "fashion-mnist"  # the model's other metadata kept

    # eval reads them from the model, and says so; the same as giving them again
    recorded, err = _top1(capsys, str(small))
    assert f"mean {float(MEAN):.3g} std {float(STD):.3g} (from the model's metadata)" in err
    explicit, err = _top1(capsys, str(small), "--mean", MEAN, "--std", STD)
    assert "(as given)" in err
    assert recorded == explicit > 0.5
    # without them the same reduced model reads the data wrong: the record is what helped
    assert _top1(capsys, str(plain))[0] < recorded - 0.2
    # explicit flags win over the record
    overridden, err = _top1(capsys, str(small), "--mean", "0.8")
    assert "mean as given, std from the model's metadata" in err
    assert overridden < recorded - 0.2

    trained = tmp_path / "trained.onnx"
    retrain = ["retrain", str(small), "-o", str(trained), "--data", str(FMNIST_TRAIN_SAMPLE)]
    assert main([*retrain, "--limit", "64", "--epochs", "1", "--lr", "0.001"]) == 0
    assert "(from the model's metadata)" in capsys.readouterr().err
    assert _metadata(trained)["onnx_mbs.mean"] == meta["onnx_mbs.mean"]


def test_per_channel_values_recorded_exactly(tmp_path, zoo_onnx, capsys):
    """An RGB model: three values each, recorded to full precision."""
    model = zoo_onnx("resnet20")
    path = tmp_path / "rgb.onnx"
    onnx.save(model, str(path))
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    data = write_npz(tmp_path / "x.npz", **random_images(8, shape[1:], labels=False))
    out = tmp_path / "small.onnx"
    mean, std = "0.4914,0.4822,0.4465", "0.2470,0.2435,0.2616"
    command = ["reduce", str(path), "-o", str(out), "--data", data, "--no-eval"]
    assert main([*command, "--mean", mean, "--std", std]) == 0
    meta = _metadata(out)
    assert [float(v) for v in meta["onnx_mbs.mean"].split(",")] == [0.4914, 0.4822, 0.4465]
    assert [float(v) for v in meta["onnx_mbs.std"].split(",")] == [0.2470, 0.2435, 0.2616]


def test_mean_std_without_data_are_refused(plain, tmp_path, capsys):
    out = tmp_path / "small.onnx"
    assert main(["reduce", str(plain), "-o", str(out), "--mean", MEAN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "would be ignored" in err
    assert not out.exists()


def test_the_originals_measured_accuracy_does_not_travel(bundled_model_path, tmp_path, capsys):
    """The bundled model records its test top-1 and how it was trained; a reduced or
    retrained model is another model, so neither figure may be carried over as its own.
    The preprocessing (what the data needs) still travels."""
    original = _metadata(bundled_model_path)
    assert {"onnx_mbs.test_top1", "onnx_mbs.train", "onnx_mbs.mean"} <= set(original)
    small, tuned = tmp_path / "small.onnx", tmp_path / "tuned.onnx"
    assert (
        main(["reduce", str(bundled_model_path), "-o", str(small), "--budget", "params=0.5"]) == 0
    )
    data = ["--data", str(FMNIST_SAMPLE), "--limit", "64", "--epochs", "1"]
    assert main(["retrain", str(bundled_model_path), "-o", str(tuned), *data]) == 0
    capsys.readouterr()
    for written in (small, tuned):
        kept = _metadata(written)
        assert "onnx_mbs.test_top1" not in kept and "onnx_mbs.train" not in kept, written.name
        for key in ("onnx_mbs.mean", "onnx_mbs.std", "onnx_mbs.dataset", "onnx_mbs.model"):
            assert kept[key] == original[key], (written.name, key)


def test_a_model_nothing_was_cut_from_keeps_its_measurements(bundled_model_path, tmp_path):
    """A budget of 1 cuts nothing: the written model is the input, weights and all, so its
    recorded test top-1 still describes it (the MacroblockScaling pass keeps it too). Given
    another mean/std to record, the figure no longer describes what the model reads: dropped."""
    original = _metadata(bundled_model_path)
    same, other = tmp_path / "same.onnx", tmp_path / "other.onnx"
    args = ["reduce", str(bundled_model_path), "--budget", "params=1", "--strategy", "global"]
    assert main([*args, "-o", str(same)]) == 0
    kept = _metadata(same)
    assert kept["onnx_mbs.test_top1"] == original["onnx_mbs.test_top1"]
    assert kept["onnx_mbs.train"] == original["onnx_mbs.train"]
    data = ["--data", str(FMNIST_SAMPLE), "--limit", "16", "--mean", "0.5", "--std", "0.5"]
    assert main([*args, "-o", str(other), *data]) == 0
    moved = _metadata(other)
    assert moved["onnx_mbs.mean"] == "0.5"
    assert "onnx_mbs.test_top1" not in moved and "onnx_mbs.train" not in moved

"""Retraining through the bridge: learns, is deterministic, distils, runs under torchrun."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import write_npz
from graphs import assert_runs_at_declared_shapes, run
from processes import run as run_process
from torch import nn

from onnx_mbs.bridge import OnnxModule, retrain, untie_initializers
from onnx_mbs.cli import main as cli_main
from onnx_mbs.models.export import export_onnx
from onnx_mbs.passes.errors import BadInputError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def quadrant_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """1x8x8 noise images; the class is the quadrant that is bright."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0, 0.4, size=(n, 1, 8, 8)).astype(np.float32)
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, 0, r * 4 : r * 4 + 4, col * 4 : col * 4 + 4] += 1.0
    return x, y.astype(np.int64)


class QuadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.bn(self.conv(x))), 1))


def export(keep_bn: bool, seed: int = 0) -> onnx.ModelProto:
    """QuadNet through the zoo's exporter: BN kept ("train") or folded ("deploy")."""
    torch.manual_seed(seed)
    form = "train" if keep_bn else "deploy"
    return export_onnx(QuadNet(), (1, 1, 8, 8), form=form, dynamic_batch=True)


def ort_top1(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    logits = run(model, {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def assert_same_nodes(result: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """The result has exactly the original's nodes (names, types, inputs, outputs), in order."""
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in result.graph.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in original.graph.node
    ]


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module")
def train() -> tuple[np.ndarray, np.ndarray]:
    return quadrant_data(256, seed=1)


@pytest.fixture(scope="module")
def val() -> tuple[np.ndarray, np.ndarray]:
    return quadrant_data(128, seed=2)


@pytest.fixture(scope="module")
def trained(train, val):
    """The BN-kept model after 3 epochs (also the teacher for distillation)."""
    model = export(keep_bn=True)
    result = retrain(
        model, train, val, epochs=3, lr=0.05, batch_size=32, device="cpu", progress=False
    )
    return model, result


def test_retraining_learns_and_keeps_the_best_epoch(trained, val) -> None:
    model, result = trained
    before = ort_top1(model, *val)
    tops = [e.val_top1 for e in result.history]
    assert len(tops) == 3
    assert result.best_epoch == int(np.argmax(tops))
    assert result.best_val_top1 >= 0.85
    assert result.best_val_top1 >= before + 0.3
    assert result.history[-1].train_loss < result.history[0].train_loss
    assert result.device == "cpu" and result.images_per_second > 0
    # The written ONNX scores in onnxruntime what the torch module scored.
    assert ort_top1(result.model, *val) == pytest.approx(result.best_val_top1, abs=1e-9)
    # Same graph (less the exporter's Identity ties), new weights.
    assert_same_nodes(result.model, model)
    before = weights(untie_initializers(model))
    changed = [k for k, v in weights(result.model).items() if not np.array_equal(v, before[k])]
    assert changed


def test_retraining_is_deterministic(train, val) -> None:
    model = export(keep_bn=True)
    before = model.SerializeToString()
    runs = [
        retrain(
            model,
            train,
            val,
            epochs=1,
            lr=0.05,
            batch_size=32,
            seed=s,
            device="cpu",
            progress=False,
        )
        for s in (3, 3, 4)
    ]
    a, b, c = (weights(r.model) for r in runs)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)
    assert runs[0].history[0].train_loss == runs[1].history[0].train_loss
    assert model.SerializeToString() == before  # the input model is never modified


@dataclass
class _Batch:
    x: np.ndarray
    y: np.ndarray | None


class _Source:
    """The DataSource interface: __len__ and batches(batch_size)."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int):
        for i in range(0, len(self.x), batch_size):
            yield _Batch(
                self.x[i : i + batch_size], None if self.y is None else self.y[i : i + batch_size]
            )


def test_data_source_and_arrays_give_the_same_result(train, val) -> None:
    model = export(keep_bn=True)
    kwargs = {"epochs": 1, "lr": 0.05, "batch_size": 32, "device": "cpu", "progress": False}
    from_arrays = retrain(model, train, val, **kwargs)
    from_source = retrain(model, _Source(*train), _Source(*val), **kwargs)
    a, b = weights(from_arrays.model), weights(from_source.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_distillation_changes_training_and_works_without_labels(trained, train, val) -> None:
    _, teacher = trained
    model = export(keep_bn=True)
    kwargs = {"epochs": 1, "lr": 0.05, "batch_size": 32, "device": "cpu", "progress": False}
    plain = retrain(model, train, val, **kwargs)
    distilled = retrain(model, train, val, teacher=teacher.model, distill_alpha=0.7, **kwargs)
    a, b = weights(plain.model), weights(distilled.model)
    assert not all(np.array_equal(a[k], b[k]) for k in a)
    assert plain.history[0].train_loss != distilled.history[0].train_loss
    # Labels withheld: the teacher alone teaches the task.
    unlabeled = retrain(
        model,
        (train[0], None),
        val,
        teacher=teacher.model,
        epochs=2,
        lr=0.05,
        batch_size=32,
        device="cpu",
        progress=False,
    )
    assert unlabeled.best_val_top1 >= ort_top1(model, *val) + 0.3


def test_bn_folded_graph_retrains(train, val) -> None:
    model = export(keep_bn=False)
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    result = retrain(
        model, train, val, epochs=3, lr=0.02, batch_size=32, device="cpu", progress=False
    )
    assert result.best_val_top1 >= ort_top1(model, *val) + 0.3
    assert ort_top1(result.model, *val) == pytest.approx(result.best_val_top1, abs=1e-9)


def test_the_reported_val_top1_is_the_written_models(train, val) -> None:
    """With BatchNorms re-inserted, their statistics are measured again after training before
    they are folded back: the best epoch's top-1 (what the run printed as its result) is not
    the written model's. `val_top1` is measured after, on what is written."""
    model = export(keep_bn=False)
    kwargs = {"epochs": 2, "lr": 0.02, "batch_size": 32, "device": "cpu", "progress": False}
    result = retrain(model, train, val, bn_calibration_samples=2, **kwargs)
    assert result.bn_reinserted
    written = ort_top1(result.model, *val)
    assert result.best_val_top1 != pytest.approx(written, abs=1e-9)  # the case shows it
    assert result.val_top1 == pytest.approx(written, abs=1e-9)


class FreshHeadNet(nn.Module):
    """Convs, then a head with two BatchNorm1d as built (ones and zeros): torch's exporter
    stores their equal tensors once and ties the others to it through Identity nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1)
        )
        self.head = nn.Sequential(
            nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
            nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.convs(x)).mean((2, 3)))


def test_reduced_model_with_fresh_batchnorms_retrains(train) -> None:
    """`reduce` writes the exporter's Identity ties as one tensor read by several nodes (its
    normal form): here each BN's running statistics and the other BN's and its own affine
    terms. Retraining gives every BatchNormalization input its own tensor, so statistics
    are neither trained nor shared between two BNs that update them."""
    from onnx_mbs.pipeline import reduce

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.onnx.export(
        FreshHeadNet().eval(), (torch.zeros(1, 1, 8, 8),), buffer,
        input_names=["input"], dynamic_axes={"input": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    model = onnx.load_from_string(buffer.getvalue())
    reduced, _ = reduce(model, budget="params=0.9", progress=False)
    bns = [n for n in reduced.graph.node if n.op_type == "BatchNormalization"]
    assert len({*bns[0].input[1:], *bns[1].input[1:]}) < 8  # shared, as written
    result = retrain(reduced, train, None, epochs=1, batch_size=32, device="cpu", progress=False)
    bns = [n for n in result.model.graph.node if n.op_type == "BatchNormalization"]
    inputs = [name for n in bns for name in n.input[1:]]
    assert len(set(inputs)) == len(inputs)
    values = weights(result.model)
    means = [values[n.input[3]] for n in bns]
    assert not np.array_equal(means[0], means[1]) and all(m.any() for m in means)
    assert np.isfinite(run(result.model, {"input": train[0][:4]})[0]).all()


def test_adamw_and_no_validation(train) -> None:
    model = export(keep_bn=True)
    result = retrain(
        model,
        train,
        None,
        epochs=2,
        lr=0.01,
        optimizer="adamw",
        batch_size=64,
        device="cpu",
        progress=False,
    )
    assert result.best_epoch == 1 and np.isnan(result.history[0].val_top1)
    assert ort_top1(result.model, *train) > ort_top1(model, *train) + 0.3


def test_bad_inputs_are_refused(train) -> None:
    model = export(keep_bn=True)
    with pytest.raises(BadInputError, match=r"\(256, 1, 6, 8\).*expects"):
        retrain(model, (train[0][:, :, :6], train[1]), None, progress=False)
    with pytest.raises(BadInputError, match="no labels"):
        retrain(model, (train[0], None), None, progress=False)
    with pytest.raises(BadInputError, match="optimizer"):
        retrain(model, train, None, optimizer="lbfgs", progress=False)


@pytest.mark.parametrize(
    "case, message",
    [
        ("no training samples", "training data has no samples"),
        ("one training sample", "at least 2 training samples"),
        ("negative label", "training data has negative labels"),
        ("fractional labels", "training data labels are not whole numbers"),
        ("no validation samples", "validation data has no samples"),
        ("negative validation label", "validation data has negative labels"),
    ],
)
def test_arrays_that_cannot_train_are_refused_before_training(train, case, message) -> None:
    """Arrays given to the Python API are checked as data files are (`onnx_mbs.data.spec`),
    before any training: they crashed with an IndexError (no sample, one sample, a negative
    label in the loss), a ZeroDivisionError after the first epoch (empty validation data), or
    trained on fractional labels truncated to classes."""
    x, y = train
    data, val = {
        "no training samples": ((x[:0], y[:0]), None),
        "one training sample": ((x[:1], y[:1]), None),
        "negative label": ((x, y - 1), None),
        "fractional labels": ((x, y + 0.5), None),
        "no validation samples": ((x, y), (x[:0], y[:0])),
        "negative validation label": ((x, y), (x[:8], y[:8] - 1)),
    }[case]
    with pytest.raises(BadInputError, match=message):
        retrain(export(keep_bn=True), data, val, batch_size=16, progress=False)


def test_non_finite_training_data_is_named_not_blamed_on_the_learning_rate(train) -> None:
    """A NaN in the inputs makes the loss NaN at any learning rate: the refusal says the data
    holds it (it said the training diverged and to lower --lr)."""
    x, y = train[0].copy(), train[1]
    x[5, 0, 2, 3] = np.nan
    with pytest.raises(BadInputError, match="training data holds non-finite values") as caught:
        retrain(export(keep_bn=True), (x, y), batch_size=16, progress=False)
    assert "lr" not in str(caught.value)


class FlatBNNet(nn.Module):
    """A Conv without BatchNorm (so the graph counts as BN-folded and gets one re-inserted),
    then a BatchNorm over (batch, features): one value per channel in a batch of one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 16)
        self.bn = nn.BatchNorm1d(16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flatten(torch.relu(self.conv(x)), 1)
        return self.out(torch.relu(self.bn(self.fc(y))))


def flat_bn_net() -> onnx.ModelProto:
    torch.manual_seed(0)
    return export_onnx(FlatBNNet(), (1, 1, 8, 8), form="train", dynamic_batch=True)


def test_a_uint8_input_model_trains_on_what_onnxruntime_is_fed(train, val) -> None:
    """retrain() of a model taking uint8 pixels (a Cast in its graph) took floats, here
    normalised ones, which the written model, fed uint8 by onnxruntime, never sees: it trained on
    them without a word. Floats are refused for it now, as `recalibrate_model` refuses them; its
    uint8 arrays are fed as they are, and the top-1 it reports is onnxruntime's."""
    from test_cli_retrain import with_uint8_input

    model = with_uint8_input(export(keep_bn=True))
    common = dict(epochs=1, batch_size=32, progress=False, workers=0)
    with pytest.raises(BadInputError, match="takes uint8, fed as it is"):
        retrain(model, train, **common)
    with pytest.raises(BadInputError, match="takes uint8, fed as it is"):
        retrain(model, (np.clip(train[0] * 60 + 60, 0, 255).astype(np.uint8), train[1]), val)
    pixels = [(np.clip(x * 60 + 60, 0, 255).astype(np.uint8), y) for x, y in (train, val)]
    result = retrain(model, *pixels, teacher=with_uint8_input(export(keep_bn=True)), **common)
    assert result.model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert ort_top1(result.model, *pixels[1]) == pytest.approx(result.val_top1, abs=1e-9)


def test_recalibration_after_training_skips_a_batch_of_one(train) -> None:
    """The re-inserted BNs are measured again after training in batches of the probe's size;
    33 samples in batches of 16 left a last batch of one, and the graph's own BatchNorm over
    (batch, features) crashed on it in train mode (ValueError, after all the training)."""
    x, y = train[0][:33], train[1][:33]
    result = retrain(flat_bn_net(), (x, y), batch_size=16, progress=False)
    assert result.bn_reinserted == 1
    assert np.isfinite(run(result.model, {"input": x})[0]).all()


def test_a_batch_of_one_value_per_channel_is_refused_in_one_line(train) -> None:
    """Batch statistics of one value are undefined: torch raised a ValueError traceback."""
    with pytest.raises(BadInputError, match="BatchNormalization .* batch of 1.*batch size"):
        retrain(flat_bn_net(), train, batch_size=1, progress=False)


@pytest.mark.parametrize("device", ["tpu", "cuda:7"])
def test_a_device_torch_cannot_use_is_refused_in_one_line(train, device) -> None:
    """The command line refused these; the Python API raised torch's RuntimeError or
    AssertionError from deep inside."""
    with pytest.raises(BadInputError, match=f"device={device!r}"):
        retrain(export(keep_bn=True), train, device=device, progress=False)


def test_integer_pixels_given_as_arrays_are_refused(train) -> None:
    """(x, y) arrays are model inputs, fed as they are: uint8 pixels (an npz's x as
    np.load reads it) were cast to float and trained on as 0..255, where the command
    line normalises the same file; refused, for training, validation and recalibration."""
    from onnx_mbs.bridge.train import recalibrate_model

    model = export(keep_bn=True)
    pixels = (np.clip(train[0] * 60 + 60, 0, 255).astype(np.uint8), train[1])
    with pytest.raises(BadInputError, match="training data: x has dtype uint8"):
        retrain(model, pixels, None, progress=False)
    with pytest.raises(BadInputError, match="validation data: x has dtype uint8"):
        retrain(model, train, pixels, progress=False)
    with pytest.raises(BadInputError, match="calibration data: x has dtype uint8"):
        recalibrate_model(model, pixels)


def _write_npz(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    write_npz(path, x=np.clip(x * 60 + 60, 0, 255).astype(np.uint8), y=y)


def test_retrain_command(tmp_path, train, val) -> None:
    model = export(keep_bn=True)
    onnx.save(model, tmp_path / "m.onnx")
    _write_npz(tmp_path / "train.npz", *train)
    _write_npz(tmp_path / "val.npz", *val)
    code = cli_main(
        [
            "retrain",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "out.onnx"),
            "--data",
            str(tmp_path / "train.npz"),
            "--val",
            str(tmp_path / "val.npz"),
            "--epochs",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    onnx.checker.check_model(onnx.load(tmp_path / "out.onnx"))
    assert_runs_at_declared_shapes(model, onnx.load(tmp_path / "out.onnx"))
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []
    np.savez(tmp_path / "bad.npz", images=train[0])
    code = cli_main(
        [
            "retrain",
            str(tmp_path / "m.onnx"),
            "-o",
            str(tmp_path / "bad.onnx"),
            "--data",
            str(tmp_path / "bad.npz"),
        ]
    )
    assert code == 2 and not (tmp_path / "bad.onnx").exists()


def torchrun_retrain(
    tmp_path: Path, *args: str, processes: int | None = 2
) -> subprocess.CompletedProcess:
    """`onnx-mbs retrain m.onnx -o out.onnx --data train.npz` in tmp_path under torchrun with
    `processes` on the CPU (None: without torchrun), one epoch, batch 16, and `args`."""
    command = [sys.executable]
    if processes is not None:
        command += ["-m", "torch.distributed.run", "--standalone"]
        command += [f"--nproc_per_node={processes}"]
    command += ["-m", "onnx_mbs", "retrain", str(tmp_path / "m.onnx")]
    command += ["-o", str(tmp_path / "out.onnx"), "--data", str(tmp_path / "train.npz")]
    command += ["--epochs", "1", "--batch-size", "16", "--device", "cpu", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return run_process(command, capture_output=True, text=True, env=env, cwd=tmp_path)


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path, train) -> None:
    model = export(keep_bn=True)
    onnx.save(model, tmp_path / "m.onnx")
    _write_npz(tmp_path / "train.npz", train[0][:64], train[1][:64])
    proc = torchrun_retrain(tmp_path, "--val", str(tmp_path / "train.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x2" in proc.stdout  # rank 0 reports a world size of 2, once
    assert proc.stdout.count("best epoch") == 1
    assert proc.stderr.count("preprocessing: ") == 2  # --data and --val, said by rank 0 alone
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out)
    assert_same_nodes(out, model)
    x, y = train[0][:64], train[1][:64]
    x_uint8 = np.clip(x * 60 + 60, 0, 255).astype(np.uint8).astype(np.float32) / 255
    # the written model is the one rank 0 scored: its top-1 on the validation set
    # (these 64 images) in onnxruntime is the one the command reported
    reported = re.search(r"best epoch 1 \(by .*\): val top-1 ([0-9.]+)%", proc.stdout)
    assert reported, proc.stdout
    # printed with 2 decimals in percent: within half a unit (and float slack) of the truth
    assert ort_top1(out, x_uint8, y) == pytest.approx(float(reported.group(1)) / 100, abs=5.1e-5)
    before = weights(untie_initializers(model))
    changed = [k for k, v in weights(out).items() if not np.array_equal(v, before[k])]
    assert changed
    # The module built from the result runs and agrees with onnxruntime.
    module = OnnxModule(out).eval()
    with torch.no_grad():
        ours = module(torch.from_numpy(x_uint8)).numpy()
    np.testing.assert_allclose(ours, run(out, {"input": x_uint8})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torchrun_with_one_process_writes_what_plain_retrain_writes(tmp_path, train) -> None:
    """One process under torchrun (WORLD_SIZE=1) trains as a plain run: the same weights."""
    onnx.save(export(keep_bn=False), tmp_path / "m.onnx")
    _write_npz(tmp_path / "train.npz", train[0][:72], train[1][:72])
    written = []
    for processes in (1, None):
        proc = torchrun_retrain(tmp_path, "--epochs", "2", processes=processes)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "x1" in proc.stdout
        written.append(weights(onnx.load(tmp_path / "out.onnx")))
    assert written[0].keys() == written[1].keys()
    for name, value in written[0].items():
        np.testing.assert_array_equal(written[1][name], value, err_msg=name)


class ScoredQuadNet(QuadNet):
    """QuadNet with a second head, a (batch, 1) score no loss reads when training on labels."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(torch.relu(self.bn(self.conv(x))), 1)
        return self.fc(features), self.score(features)


@pytest.mark.slow
def test_torchrun_with_weights_no_loss_reads(tmp_path, train) -> None:
    """A head no loss term reads (a score beside the logits, trained on labels) leaves its
    weights without gradients; DistributedDataParallel refused that at the second step
    ("Expected to have finished reduction in the prior iteration"). Now it trains, and the
    unread head is written unchanged, as in one process."""
    torch.manual_seed(0)
    model = export_onnx(
        ScoredQuadNet(),
        (1, 1, 8, 8),
        form="train",
        dynamic_batch=True,
        output_names=("logits", "score"),
    )
    onnx.save(model, tmp_path / "m.onnx")
    _write_npz(tmp_path / "train.npz", train[0][:64], train[1][:64])
    proc = torchrun_retrain(tmp_path, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = weights(untie_initializers(model)), weights(onnx.load(tmp_path / "out.onnx"))
    changed = {k for k, v in after.items() if not np.array_equal(v, before[k])}
    assert {"score.weight", "score.bias"}.isdisjoint(changed)
    assert {"fc.weight", "conv.weight"} <= changed


def test_label_free_classifier_learns_from_the_teachers_argmax():
    """Without labels, a classifier's CE term uses the teacher's argmax as labels: training on
    unlabelled data equals training on data labelled with the teacher's predictions."""
    x, _ = quadrant_data(128, seed=1)
    teacher = export(keep_bn=True, seed=3)
    pseudo = run(teacher, x)[0].argmax(1).astype(np.int64)
    common = dict(teacher=teacher, epochs=1, lr=0.05, device="cpu", progress=False, seed=0)
    unlabelled = retrain(export(keep_bn=True), (x, None), distill_alpha=0.0, **common)
    labelled = retrain(export(keep_bn=True), (x, pseudo), distill_alpha=0.0, **common)
    for a, b in zip(unlabelled.model.graph.initializer, labelled.model.graph.initializer):
        np.testing.assert_allclose(
            onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b), atol=1e-6
        )
    assert unlabelled.history[0].train_loss == pytest.approx(labelled.history[0].train_loss)


def test_a_val_folder_with_other_classes_than_the_training_folder_is_refused(tmp_path) -> None:
    """Folder labels are positions in each folder's sorted class list: a --val folder without
    `bee` numbered cat 1 and dog 2 (2 and 3 in training), and every epoch was scored, and the
    best one kept, against shifted labels. An empty `bee` folder keeps the numbering."""
    from PIL import Image

    from onnx_mbs.data import open_data
    from onnx_mbs.data.spec import check_same_classes

    def folder(name: str, classes: list[str]) -> Path:
        for k, c in enumerate(classes):
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(
                    tmp_path / name / c / f"{i}.png"
                )
        return tmp_path / name

    train_source = open_data(folder("train", ["ant", "bee", "cat", "dog"]), "input", (1, 1, 8, 8))
    val_source = open_data(folder("val", ["ant", "cat", "dog"]), "input", (1, 1, 8, 8))
    with pytest.raises(BadInputError, match=r"classes.*differ.*bee.*cat is 2 .* 1"):
        retrain(export(keep_bn=True), train_source, val_source, epochs=1, progress=False)
    (tmp_path / "val" / "bee").mkdir()
    check_same_classes(train_source, open_data(tmp_path / "val", "input", (1, 1, 8, 8)))


def test_val_labels_past_the_training_folder_s_classes_are_refused(tmp_path) -> None:
    """An npz (or IDX, or arrays) for --val carries no class names: its labels are positions
    in the training folder's sorted class list. A label past that list (3 beside a training
    folder of 3 classes) named no class the training data has, yet the model's 4 logits let
    it through, and every epoch was scored against it. Labels within the list are kept, and a
    training npz beside a validation folder is not compared (it has no names)."""
    from PIL import Image

    from onnx_mbs.data import open_data

    for k, c in enumerate(["ant", "bee", "cat"]):
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 60 * k + i, np.uint8)).save(
                tmp_path / "train" / c / f"{i}.png"
            )
    train_source = open_data(tmp_path / "train", "input", (1, 1, 8, 8))
    x = np.random.default_rng(0).integers(0, 255, (8, 1, 8, 8), dtype=np.uint8)

    def val(top: int):
        y = np.arange(8, dtype=np.int64) % (top + 1)
        return open_data(write_npz(tmp_path / f"val{top}.npz", x=x, y=y), "input", (1, 1, 8, 8))

    with pytest.raises(BadInputError, match=r"label 3 .*validation.* 3 classes .*ant, bee, cat"):
        retrain(export(keep_bn=True), train_source, val(3), epochs=1, progress=False)
    with pytest.raises(BadInputError, match=r"label 3 .*validation"):
        retrain(export(keep_bn=True), train_source, (x / 255.0, np.arange(8) % 4), progress=False)
    result = retrain(export(keep_bn=True), train_source, val(2), epochs=1, progress=False)
    assert result.history
    result = retrain(export(keep_bn=True), val(3), train_source, epochs=1, progress=False)
    assert result.history


# Metamorphic checks: a learning rate too small to move a float32 weight trains nothing, so
# the written model must be its input, except for what training moves without the learning rate.
NO_STEP = dict(epochs=2, lr=1e-30, batch_size=16, device="cpu", progress=False)


def test_a_vanishing_learning_rate_moves_only_batchnorm_statistics(train) -> None:
    """BN kept: only the running statistics move (train-mode forwards update them); with them
    put back the written model computes its input's outputs. BN-folded trained as it is
    (reinsert_bn=False): nothing moves. (BN re-inserted: the folded model comes back, up to
    float32 rounding: test_bn_reinsert's test_a_retrain_that_trains_nothing_writes_...)"""
    x = train[0][:64]
    kept = export(keep_bn=True)
    result = retrain(kept, train, **NO_STEP)
    bn = next(n for n in kept.graph.node if n.op_type == "BatchNormalization")
    before, after = weights(kept), weights(result.model)
    assert after.keys() == before.keys()
    # A weight at 0 (a fresh BN's shift) takes steps of lr * gradient: tiny, not none.
    moved = {k for k in before if not np.allclose(after[k], before[k], rtol=0, atol=1e-20)}
    assert moved == {bn.input[3], bn.input[4]}
    put_back = onnx.ModelProto()
    put_back.CopyFrom(result.model)
    for t in put_back.graph.initializer:
        if t.name in moved:
            t.CopyFrom(onnx.numpy_helper.from_array(before[t.name], t.name))
    np.testing.assert_allclose(
        run(put_back, {"input": x})[0], run(kept, {"input": x})[0], atol=1e-6
    )
    folded = export(keep_bn=False)
    result = retrain(folded, train, reinsert_bn=False, **NO_STEP)
    assert_same_nodes(result.model, folded)
    for name, value in weights(folded).items():
        np.testing.assert_allclose(weights(result.model)[name], value, rtol=0, atol=1e-20)


def tied_gemm_model(dtype: np.dtype) -> onnx.ModelProto:
    """x (N, 4) -> Gemm(W, transB=1) -> Relu -> MatMul(W) -> Gemm(W2, b, alpha, transB=1):
    one initializer W read transposed by a Gemm and as it is by a MatMul (tied weights)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    inits = {
        "W": rng.normal(0, 0.5, (3, 4)),
        "W2": rng.normal(0, 0.5, (4, 4)),
        "b": rng.normal(0, 0.1, 4),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["h"], transB=1),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W"], ["m"]),
        helper.make_node("Gemm", ["m", "W2", "b"], ["logits"], alpha=0.7, transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", elem, ["N", 4])],
        [helper.make_tensor_value_info("logits", elem, ["N", 4])],
        [onnx.numpy_helper.from_array(v.astype(dtype), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_tied_and_transposed_weights_write_back_what_the_module_trained(dtype, monkeypatch):
    """The written initializers are the module's parameters after training, each in its own
    dtype and layout (a transposed Gemm weight, one weight read by two nodes); with a vanishing
    learning rate they are the input's, bit for bit."""
    import onnx_mbs.bridge.train as train_module

    model = tied_gemm_model(dtype)
    rng = np.random.default_rng(1)
    data = rng.normal(0, 1, (64, 4)).astype(np.float32), rng.integers(0, 4, 64)
    same = retrain(model, data, **NO_STEP)
    for name, value in weights(model).items():
        np.testing.assert_array_equal(weights(same.model)[name], value, err_msg=name)
    seen = {}
    real = train_module.write_back

    def write_back(graph, module):
        seen.update({n: module.initializer(n).detach().numpy().copy() for n in weights(graph)})
        return real(graph, module)

    monkeypatch.setattr(train_module, "write_back", write_back)
    trained = retrain(model, data, **{**NO_STEP, "lr": 0.1})
    got = weights(trained.model)
    assert got.keys() == seen.keys() == {"W", "W2", "b"}
    for name, value in seen.items():
        assert got[name].dtype == dtype
        np.testing.assert_array_equal(got[name], value.astype(dtype), err_msg=name)
        assert not np.array_equal(got[name], weights(model)[name]), name


@pytest.mark.parametrize(
    ("count", "batch", "sizes"), [(90, 16, [16] * 5 + [10]), (97, 16, [16] * 6), (3, 2, [2])]
)
def test_each_epoch_trains_every_sample_once_but_a_lone_last_one(count, batch, sizes, monkeypatch):
    """An epoch is ceil(count / batch) steps over a permutation: a partial last batch trains,
    a last batch of one sample is left out (BatchNorm in train mode needs two), and the
    schedule counts the steps that ran."""
    import onnx_mbs.bridge.train as train_module

    real = train_module.load_batches
    batches: list[list[int]] = []

    def load_batches(samples, keys, *args):
        batches.append([len(indices) for _, indices in keys])
        seen = np.concatenate([indices for _, indices in keys])
        assert len(np.unique(seen)) == len(seen)  # no sample twice in an epoch
        return real(samples, keys, *args)

    monkeypatch.setattr(train_module, "load_batches", load_batches)
    result = retrain(
        export(keep_bn=True),
        quadrant_data(count, seed=1),
        epochs=2,
        lr=0.05,
        batch_size=batch,
        device="cpu",
        progress=False,
    )
    assert batches == [sizes, sizes]
    assert f" of {2 * len(sizes)} steps then" in result.schedule

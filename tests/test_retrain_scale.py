"""Retraining at scale: checkpoints and resume, data loading in workers, augmentation, schedule,
epoch lines as epochs end, label-free validation. Tiny data: every test runs in seconds."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import onnx
import processes
import pytest
import torch
from conftest import write_npz
from graphs import run
from PIL import Image
from test_retrain import export, quadrant_data, weights

from onnx_mbs.bridge import checkpoint as ckpt
from onnx_mbs.bridge import retrain
from onnx_mbs.bridge.loading import as_samples, load_batches, rank_batches
from onnx_mbs.cli import main as cli_main
from onnx_mbs.data import open_data
from onnx_mbs.data.augment import Augment, choose_augment
from onnx_mbs.data.preprocess import Preprocess
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.schedule import default_lr, lr_factor

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def pixels(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """quadrant_data as uint8 pixels (what an npz or a folder of PNGs holds)."""
    x, y = quadrant_data(n, seed)
    return np.clip(x * 60 + 60, 0, 255).astype(np.uint8), y


@pytest.fixture(scope="module")
def npz(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("npz") / "train.npz"
    x, y = pixels(96, seed=1)
    write_npz(path, x=x, y=y)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The same kind of images as PNG files, one sub-folder per class."""
    root = tmp_path_factory.mktemp("images")
    x, y = pixels(40, seed=3)
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        (root / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image[0]).save(root / str(label) / f"{i:03d}.png")
    return root


def source(path: Path):
    return open_data(str(path), "input", [1, 1, 8, 8])


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(monkeypatch, epoch: int) -> None:
    """The job dies right after the checkpoint of `epoch` is written (as a killed job would)."""
    real = ckpt.save

    def save(directory, state):
        real(directory, state)
        if state["epoch"] == epoch:
            raise Interrupt

    monkeypatch.setattr(ckpt, "save", save)


def test_interrupted_and_resumed_equals_uninterrupted(npz, tmp_path, monkeypatch) -> None:
    """Weight for weight, after an interruption at any epoch, with augmentation on, a teacher,
    validation (the best epoch is kept), and the workers changed between the runs."""
    teacher = export(keep_bn=True, seed=4)
    common = dict(
        teacher=teacher,
        epochs=3,
        batch_size=16,
        seed=7,
        device="cpu",
        progress=False,
        label_smoothing=0.1,
    )
    val = (quadrant_data(32, seed=9)[0], quadrant_data(32, seed=9)[1])
    whole = retrain(export(keep_bn=True), source(npz), val, workers=0, **common)
    assert whole.augment.startswith("standard: random 8x8 crop")
    expected = weights(whole.model)
    for stop in (1, 2):
        directory = tmp_path / f"ckpt{stop}"
        with monkeypatch.context() as patch:
            interrupt_after(patch, stop)
            with pytest.raises(Interrupt):
                retrain(
                    export(keep_bn=True),
                    source(npz),
                    val,
                    checkpoint=directory,
                    workers=2,
                    **common,
                )
        assert torch.load(ckpt.path_in(directory), weights_only=True)["epoch"] == stop
        resumed = retrain(
            export(keep_bn=True),
            source(npz),
            val,
            checkpoint=directory,
            resume=True,
            workers=1,
            **common,
        )
        assert resumed.resumed_from == stop
        got = weights(resumed.model)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        assert resumed.best_epoch == whole.best_epoch
        for a, b in zip(resumed.history, whole.history, strict=True):
            assert (a.train_loss, a.train_acc, a.val_top1) == (
                b.train_loss,
                b.train_acc,
                b.val_top1,
            )
    # Resuming a finished run gives the same model again, without training.
    again = retrain(
        export(keep_bn=True),
        source(npz),
        val,
        checkpoint=tmp_path / "ckpt1",
        resume=True,
        **common,
    )
    assert again.resumed_from == 3
    for name, value in expected.items():
        np.testing.assert_array_equal(weights(again.model)[name], value)


def test_a_checkpoint_of_another_run_is_refused(npz, tmp_path) -> None:
    common = dict(epochs=1, batch_size=32, device="cpu", progress=False, checkpoint=tmp_path)
    retrain(export(keep_bn=True), source(npz), **common)
    with pytest.raises(BadInputError, match="after epoch 1 of 1: add resume=True to continue"):
        retrain(export(keep_bn=True), source(npz), **common)
    with pytest.raises(BadInputError, match=r"another run \(differs in: lr\)"):
        retrain(export(keep_bn=True), source(npz), lr=0.5, resume=True, **common)
    with pytest.raises(BadInputError, match=r"differs in: model\)"):
        retrain(export(keep_bn=True, seed=1), source(npz), resume=True, **common)
    with pytest.raises(BadInputError, match="needs|give one"):
        retrain(export(keep_bn=True), source(npz), resume=True, progress=False)
    blocked = tmp_path / "file"
    blocked.write_text("a file, not a directory")
    with pytest.raises(BadInputError, match="cannot use .* as the checkpoint directory"):
        retrain(export(keep_bn=True), source(npz), **{**common, "checkpoint": blocked / "c"})
    with pytest.raises(BadInputError, match="cannot write checkpoint"):
        ckpt.save(blocked / "c", {})
    ckpt.path_in(tmp_path).write_bytes(b"not a checkpoint")
    with pytest.raises(BadInputError, match="cannot read checkpoint"):
        retrain(export(keep_bn=True), source(npz), resume=True, **common)


def test_a_killed_checkpoint_write_is_cleared_by_the_next_run(tmp_path) -> None:
    """A run SIGKILLed while writing its checkpoint leaves the hidden partial file; the next
    run using DIR removes it (its process is gone), and nothing a live run or the user holds."""
    import os
    import sys
    import time

    from onnx_mbs.passes.scratch import scratch_name

    killed = (
        "import os, signal, sys, torch\n"
        "from onnx_mbs.bridge import checkpoint\n"
        "def save(state, f):\n"
        "    f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
        "torch.save = save\n"
        "checkpoint.save(sys.argv[1], {})\n"
    )
    run = processes.run([sys.executable, "-c", killed, str(tmp_path)])
    assert run.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 1 and left[0].startswith("."), left
    earlier = tmp_path / ".checkpoint.pt.4194304.partial"  # an earlier version's name
    earlier.write_bytes(b"half")
    day_old = time.time() - 2 * 86400
    os.utime(earlier, (day_old, day_old))
    kept = [tmp_path / scratch_name(), tmp_path / ".checkpoint.pt.notes"]  # a live run, the user
    for path in kept:
        path.write_bytes(b"mine")
    ckpt.prepare(tmp_path)
    assert sorted(tmp_path.iterdir()) == sorted(kept)


def test_cli_refuses_another_runs_checkpoint_in_one_line(npz, tmp_path, capsys) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    args = ["retrain", str(model), "--data", str(npz), "--checkpoint", str(tmp_path / "c")]
    assert cli_main([*args, "-o", str(tmp_path / "a.onnx"), "--device", "cpu"]) == 0
    capsys.readouterr()
    code = cli_main([*args, "-o", str(tmp_path / "b.onnx"), "--resume", "--epochs", "2"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "b.onnx").exists()
    errors = [line for line in err.splitlines() if line.startswith("onnx-mbs: error: ")]
    assert len(errors) == 1 and "differs in: epochs" in errors[0] and "Traceback" not in err


def test_an_empty_checkpoint_directory_is_refused(npz, tmp_path, monkeypatch) -> None:
    """checkpoint="" was the working directory, where checkpoint.pt was written (into the data
    folder, were the job run there); the command line refuses an empty --checkpoint itself
    (test_cli_retrain.py::test_an_empty_path_is_refused)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInputError, match="checkpoint is empty"):
        retrain(export(keep_bn=True), source(npz), checkpoint="", progress=False)
    assert list(tmp_path.iterdir()) == []


def stopped_after_one_of_two_epochs(npz: Path, directory: Path, common: dict) -> Path:
    """DIR holding the checkpoint of a run of `common` killed after its first epoch."""
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Interrupt):
            retrain(export(keep_bn=True), source(npz), checkpoint=directory, **common)
    return directory


def test_resuming_with_other_data_or_preprocessing_is_refused(npz, tmp_path) -> None:
    """The data are their pixels and their preprocessing, not the name of the file: another
    --mean/--std, or an npz of the same name and size holding other pixels, is another run."""
    common = dict(epochs=2, batch_size=32, device="cpu", progress=False, workers=0)
    directory = stopped_after_one_of_two_epochs(npz, tmp_path / "c", common)
    resume = dict(checkpoint=directory, resume=True, **common)
    other_mean = open_data(str(npz), "input", [1, 1, 8, 8], mean=[0.5], std=[0.25])
    with pytest.raises(BadInputError, match=r"differs in: training data\)"):
        retrain(export(keep_bn=True), other_mean, **resume)
    (tmp_path / "other").mkdir()
    x, y = pixels(96, seed=2)  # the same shape and count, other pixels
    other_pixels = write_npz(tmp_path / "other" / npz.name, x=x, y=y)
    with pytest.raises(BadInputError, match=r"differs in: training data\)"):
        retrain(export(keep_bn=True), source(Path(other_pixels)), **resume)
    assert retrain(export(keep_bn=True), source(npz), **resume).resumed_from == 1


def test_naming_the_default_logits_or_losses_resumes(npz, tmp_path) -> None:
    """The fingerprint held --logits and --loss as given: a run resumed with the values it had
    chosen by itself named was refused ("differs in: logits, losses"), and so the other way
    round. It holds what differs from the defaults now; another choice is still refused."""
    teacher = export(keep_bn=True, seed=3)
    common = dict(epochs=2, batch_size=32, device="cpu", progress=False, workers=0)
    common["teacher"] = teacher
    name = teacher.graph.output[0].name
    directory = stopped_after_one_of_two_epochs(npz, tmp_path / "c", common)
    resume = dict(checkpoint=directory, resume=True, **common)
    with pytest.raises(BadInputError, match=r"differs in: losses\)"):
        retrain(export(keep_bn=True), source(npz), losses={name: "mse"}, **resume)
    named = dict(logits=name, losses={name: "kl"})
    assert retrain(export(keep_bn=True), source(npz), **named, **resume).resumed_from == 1
    given = stopped_after_one_of_two_epochs(npz, tmp_path / "g", {**common, **named})
    resume["checkpoint"] = given
    assert retrain(export(keep_bn=True), source(npz), **resume).resumed_from == 1


def test_a_checkpoint_that_recorded_the_defaults_as_given_still_resumes(npz, tmp_path) -> None:
    """Checkpoints written before held --logits/--loss as given, defaults included: they
    resume with the same options, or without naming the defaults; not with another loss."""
    teacher = export(keep_bn=True, seed=3)
    name = teacher.graph.output[0].name
    named = dict(logits=name, losses={name: "kl"})
    common = dict(epochs=2, batch_size=32, device="cpu", progress=False, workers=0)
    common["teacher"] = teacher
    directory = stopped_after_one_of_two_epochs(npz, tmp_path / "c", {**common, **named})
    state = torch.load(ckpt.path_in(directory), weights_only=True)
    state["fingerprint"].update(logits=name, losses=[f"{name}=kl"])  # as earlier versions wrote
    resume = dict(checkpoint=directory, resume=True, **common)
    for options in (named, {}):
        torch.save(state, ckpt.path_in(directory))
        with pytest.raises(BadInputError, match=r"differs in: losses\)"):
            retrain(export(keep_bn=True), source(npz), **resume, losses={name: "mse"})
        assert retrain(export(keep_bn=True), source(npz), **resume, **options).resumed_from == 1


def test_the_same_data_resumes_however_its_path_is_spelled(npz, folder, tmp_path, monkeypatch):
    """The data's digest held its description, which names the file or folder as given: an npz
    copied under another name (the same pixels and labels) was refused, and so was the same
    image folder given by its absolute path after a run given it relative to the directory."""
    import shutil

    common = dict(epochs=2, batch_size=16, device="cpu", progress=False, workers=0)
    directory = stopped_after_one_of_two_epochs(npz, tmp_path / "c", common)
    renamed = Path(shutil.copy(npz, tmp_path / "renamed.npz"))
    resume = dict(checkpoint=directory, resume=True, **common)
    assert retrain(export(keep_bn=True), source(renamed), **resume).resumed_from == 1
    monkeypatch.chdir(folder.parent)
    directory = stopped_after_one_of_two_epochs(Path(folder.name), tmp_path / "f", common)
    resume = dict(checkpoint=directory, resume=True, **common)
    assert retrain(export(keep_bn=True), source(folder.absolute()), **resume).resumed_from == 1
    # A folder's images are not read up front: a copy elsewhere is other files.
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    with pytest.raises(BadInputError, match=r"differs in: training data\)"):
        retrain(export(keep_bn=True), source(copy), **resume)


def test_resuming_with_another_bn_calibration_is_refused(npz, tmp_path) -> None:
    """A BN-folded graph's re-inserted BatchNorms are measured on `bn_calibration_samples`
    samples before training and after it, where the folded weights are made: resumed with
    another count, the run wrote weights neither run would have, with no word."""
    common = dict(epochs=2, batch_size=16, device="cpu", progress=False, workers=0)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Interrupt):
            retrain(export(keep_bn=False), source(npz), checkpoint=tmp_path, **common)
    resume = dict(checkpoint=tmp_path, resume=True, **common)
    with pytest.raises(BadInputError, match=r"differs in: bn_calibration_samples\)"):
        retrain(export(keep_bn=False), source(npz), bn_calibration_samples=32, **resume)
    assert retrain(export(keep_bn=False), source(npz), **resume).resumed_from == 1


def test_a_checkpoint_of_a_machine_with_more_gpus_resumes(monkeypatch) -> None:
    """The checkpoint holds one CUDA random state per GPU the writing process saw; restored on a
    machine with fewer, torch's set_rng_state_all indexed a GPU that is not there (IndexError,
    a traceback). Torch's own code runs here, with one stand-in GPU generator."""
    import torch.cuda.random as cuda_random

    first, second = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    states = {**ckpt.random_states(), "cuda": [first.get_state(), second.get_state()]}
    gpu = torch.Generator()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "default_generators", (gpu,))
    monkeypatch.setattr(cuda_random, "_lazy_call", lambda callback: callback())
    monkeypatch.setattr(cuda_random, "is_initialized", lambda: True)
    ckpt.set_random_states(states)
    assert torch.equal(gpu.get_state(), first.get_state())


def test_a_checkpoint_whose_optimizer_groups_differ_is_refused(npz, tmp_path) -> None:
    """A checkpoint of the same run written when other parameters were decayed (an older
    onnx-mbs): torch's ValueError about parameter groups became one line."""
    common = dict(epochs=2, batch_size=32, device="cpu", progress=False, workers=0)
    directory = stopped_after_one_of_two_epochs(npz, tmp_path / "c", common)
    path = ckpt.path_in(directory)
    state = torch.load(path, map_location="cpu", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    groups[0]["params"] += groups[1]["params"]  # everything in the decayed group
    del groups[1:]
    torch.save(state, path)
    with pytest.raises(BadInputError, match="does not fit this run's parameter groups"):
        retrain(export(keep_bn=True), source(npz), checkpoint=directory, resume=True, **common)


def test_resuming_a_finished_run_says_there_is_nothing_to_train(npz, tmp_path, capsys) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    args = ["retrain", str(model), "--data", str(npz), "--checkpoint", str(tmp_path / "c")]
    args += ["--device", "cpu", "--workers", "0"]
    assert cli_main([*args, "-o", str(tmp_path / "a.onnx")]) == 0
    capsys.readouterr()
    assert cli_main([*args, "-o", str(tmp_path / "b.onnx"), "--resume"]) == 0
    out, err = capsys.readouterr()
    assert "holds all 1 epoch(s) of this run: nothing left to train" in err
    last = out.strip().splitlines()[-1]
    assert "images/s" not in last and "nothing left to train" in last, last
    assert (tmp_path / "b.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_ctrl_c_says_what_the_checkpoint_folder_holds(npz, tmp_path, monkeypatch, capsys):
    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    args = ["retrain", str(model), "--data", str(npz), "-o", str(tmp_path / "o.onnx")]
    args += ["--checkpoint", str(tmp_path / "c"), "--epochs", "2", "--workers", "0"]

    def interrupted_in_epoch_1(directory, state):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", interrupted_in_epoch_1)
        assert cli_main(args) == 130
    err = capsys.readouterr().err
    assert "no epoch finished: " in err and "holds every finished epoch" not in err, err
    interrupt_after(monkeypatch, 1)
    assert cli_main(args) == 130
    err = capsys.readouterr().err
    assert "holds every finished epoch: rerun with --resume" in err, err


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder(
    npz, tmp_path, monkeypatch, capsys
) -> None:
    """Ctrl-C, SIGTERM or a fault before the first checkpoint left the empty folder (and the
    parents) the run had made for it: partial output. They are removed now; a folder that was
    there before the run, or that holds anything (a checkpoint: the run stays resumable), is
    kept."""
    from onnx_mbs.cli import Terminated

    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    args = ["retrain", str(model), "--data", str(npz), "-o", str(tmp_path / "o.onnx")]
    args += ["--epochs", "2", "--workers", "0", "--checkpoint"]

    def stops(error: BaseException):
        def save(directory, state):
            raise error

        return save

    made = tmp_path / "runs" / "a" / "c"  # none of the three exists before the run
    for error, code in ((KeyboardInterrupt(), 130), (Terminated(), 143)):
        with monkeypatch.context() as patch:
            patch.setattr(ckpt, "save", stops(error))
            assert cli_main([*args, str(made)]) == code
        err = capsys.readouterr().err
        assert "no epoch finished: no checkpoint was written" in err, err
        assert not (tmp_path / "runs").exists()
    # A fault (here an error while writing the first checkpoint), through the Python API.
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", stops(RuntimeError("disk gone")))
        with pytest.raises(RuntimeError, match="disk gone"):
            retrain(export(keep_bn=True), source(npz), checkpoint=made, progress=False)
    assert not (tmp_path / "runs").exists()
    # A folder that was there before the run is the user's: kept, empty as it was.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", stops(KeyboardInterrupt()))
        assert cli_main([*args, str(theirs / "c")]) == 130
        assert cli_main([*args, str(theirs)]) == 130
    assert theirs.is_dir() and list(theirs.iterdir()) == []
    assert "holds no checkpoint yet" in capsys.readouterr().err

    # A folder the run made that holds something other than a checkpoint is kept.
    def writes_then_stops(directory, state):
        (Path(directory) / "notes.txt").write_text("the user's")
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "save", writes_then_stops)
        assert cli_main([*args, str(made)]) == 130
    assert (made / "notes.txt").exists()
    capsys.readouterr()
    # Stopped after its first checkpoint: the folder holds it and the run resumes.
    other = tmp_path / "more" / "c"
    interrupt_after(monkeypatch, 1)
    assert cli_main([*args, str(other)]) == 130
    assert ckpt.path_in(other).exists()
    monkeypatch.undo()
    assert cli_main([*args, str(other), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().err


def test_a_repeated_sigterm_does_not_cut_the_clean_up_short(
    npz, tmp_path, monkeypatch, capsys
) -> None:
    """torchrun killed outright sends each rank one SIGTERM per thread it loses: the repeat
    landed in the clean-up the first had started (here: removing the checkpoint folder the run
    made), which stopped half done, or in a data-loader's shutdown, which printed a traceback.
    The first SIGTERM ends the run; a repeat is ignored until the run has answered."""
    import os

    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    made = tmp_path / "runs" / "c"
    args = ["retrain", str(model), "--data", str(npz), "-o", str(tmp_path / "o.onnx")]
    args += ["--epochs", "2", "--workers", "0", "--checkpoint", str(made)]
    remove_made = ckpt.remove_made

    def sigterm_at_save(directory, state):
        os.kill(os.getpid(), signal.SIGTERM)

    def sigterm_again(folders):
        os.kill(os.getpid(), signal.SIGTERM)
        remove_made(folders)

    monkeypatch.setattr(ckpt, "save", sigterm_at_save)
    monkeypatch.setattr(ckpt, "remove_made", sigterm_again)
    assert cli_main(args) == 143
    err = capsys.readouterr().err
    assert err.endswith("onnx-mbs: terminated; nothing written\n"), err
    assert not (tmp_path / "runs").exists()
    assert not (tmp_path / "o.onnx").exists()
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # the handler it found, back


def test_checkpoint_may_not_be_an_input_or_the_output(npz, folder, tmp_path, capsys) -> None:
    """Refused before any training: a checkpoint written into the data, an output written
    over the checkpoint (or a checkpoint folder where the output goes)."""
    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    directory = tmp_path / "c"
    directory.mkdir()
    (directory / "keep.txt").write_text("a file of the user's")
    args = ["retrain", str(model), "--data", str(npz), "--device", "cpu", "--workers", "0"]
    cases = [
        (["-o", str(directory / ckpt.FILE), "--checkpoint", str(directory)], "is the checkpoint"),
        (["-o", str(tmp_path / "o.onnx"), "--checkpoint", str(tmp_path / "o.onnx")], "is the"),
        (["-o", str(tmp_path / "o.onnx"), "--checkpoint", str(folder)], "inside --val"),
        (["-o", str(tmp_path / "o.onnx"), "--checkpoint", str(model)], "checkpoint directory"),
    ]
    for extra, says in cases:
        assert cli_main([*args, *extra, "--val", str(folder)]) == 2, extra
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("onnx-mbs: error: ")]
        assert len(errors) == 1 and says in errors[0], err
        assert "epoch 1/1" not in err  # refused before training
    assert sorted(p.name for p in directory.iterdir()) == ["keep.txt"]
    assert not (tmp_path / "o.onnx").exists() and not ckpt.path_in(folder).exists()
    # The output beside the checkpoint, in its folder, is fine.
    assert cli_main([*args, "-o", str(directory / "o.onnx"), "--checkpoint", str(directory)]) == 0
    assert ckpt.path_in(directory).exists() and (directory / "o.onnx").exists()


@pytest.mark.parametrize("kind", ["folder", "npz"])
def test_batches_do_not_depend_on_workers(kind, folder, npz) -> None:
    """Same samples, same order, same augmentation for 0, 1 and 3 worker processes."""
    samples = as_samples(source(folder if kind == "folder" else npz), "data")
    recipe = choose_augment("auto", (1, 1, 8, 8), samples.preprocess)
    assert recipe is not None and recipe.pad == 1
    keys = [k for e in (0, 1) for k in rank_batches(samples.count, 5, e, 0, 1, 6, 4)]
    runs = {
        w: [(x.numpy(), y.numpy()) for x, y in load_batches(samples, keys, recipe, 5, w)]
        for w in (0, 1, 3)
    }
    assert len(runs[0]) == 8
    for w in (1, 3):
        for (x0, y0), (x, y) in zip(runs[0], runs[w], strict=True):
            np.testing.assert_array_equal(x, x0)
            np.testing.assert_array_equal(y, y0)
    # The two epochs differ in order and in augmentation.
    assert not np.array_equal(runs[0][0][1], runs[0][4][1])


def test_dropout_does_not_depend_on_workers() -> None:
    """Building the batches in worker processes drew DataLoader's base seed from torch's global
    generator, which dropout also draws from: a Dropout model trained with workers=2 (or a run
    resumed with them) wrote other weights than with workers=0 (0.00025 apart)."""
    from test_bridge import dropout_classifier

    x, y = quadrant_data(32, seed=1)
    common = dict(epochs=1, batch_size=16, seed=3, device="cpu", progress=False)
    runs = [
        weights(retrain(dropout_classifier(None), (x, y % 3), workers=w, **common).model)
        for w in (0, 2)
    ]
    for name, value in runs[0].items():
        np.testing.assert_array_equal(runs[1][name], value, err_msg=name)


def test_image_folder_and_npz_of_the_same_pixels_give_the_same_batches(folder, tmp_path) -> None:
    files = sorted(folder.glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(f))[None] for f in files])
    y = np.array([int(f.parent.name) for f in files])
    path = write_npz(tmp_path / "same.npz", x=x, y=y)
    a, b = as_samples(source(folder), "a"), as_samples(source(Path(path)), "b")
    recipe = choose_augment("standard", (1, 1, 8, 8), a.preprocess)
    keys = rank_batches(a.count, 0, 0, 0, 1, 8, 5)
    for (xa, ya), (xb, yb) in zip(
        load_batches(a, keys, recipe, 0, 2), load_batches(b, keys, recipe, 0, 0), strict=True
    ):
        np.testing.assert_array_equal(xa.numpy(), xb.numpy())
        np.testing.assert_array_equal(ya.numpy(), yb.numpy())


def test_a_bad_image_in_a_worker_is_refused_in_one_line(folder, tmp_path) -> None:
    bad = tmp_path / "bad"
    (bad / "0").mkdir(parents=True)
    for f in sorted(folder.glob("*/*.png"))[:4]:
        (bad / "0" / f.name).write_bytes(f.read_bytes())
    (bad / "0" / "zz.png").write_bytes(b"broken")
    samples = as_samples(source(bad), "data")
    keys = rank_batches(samples.count, 0, 0, 0, 1, 5, 1)
    with pytest.raises(BadInputError, match=r"^cannot read image .*zz\.png"):
        list(load_batches(samples, keys, None, 0, 2))


_CTRL_C_AT_FORK = """
import os, signal, sys
import numpy as np
from onnx_mbs.bridge.loading import as_samples, load_batches, rank_batches

armed = [True]

def ctrl_c_in_the_fork_window():  # what a Ctrl-C a moment earlier looks like
    if armed[0]:
        armed[0] = False
        os.kill(os.getpid(), signal.SIGINT)

os.register_at_fork(after_in_parent=ctrl_c_in_the_fork_window)
signal.signal(signal.SIGINT, signal.default_int_handler)  # a test runner's worker ignores it
x = np.zeros((8, 3, 4, 4), np.float32)
samples = as_samples((x, np.zeros(8, np.int64)), "data")
keys = rank_batches(8, 0, 0, 0, 1, 2, 4)
try:
    batches = sum(1 for _ in load_batches(samples, keys, None, 0, 2))
except KeyboardInterrupt:
    print("interrupted")
    sys.exit(0)
print(f"not interrupted: {batches} batches")
"""


def test_ctrl_c_while_workers_start_is_not_lost() -> None:
    """A SIGINT that arrives while the data workers are forked was raised inside a fork hook
    (logging's), where Python prints and drops it: retraining went on to the end (by hand: a
    SIGINT 1.2 s into `onnx-mbs retrain` printed "Exception ignored in ... _releaseLock" and
    the run exited 0). It must interrupt the run."""
    import sys

    done = processes.run(
        [sys.executable, "-c", _CTRL_C_AT_FORK], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "interrupted", done.stdout + done.stderr


_KILLED_AS_A_WORKER_IS_FORKED = """
import os, signal, time
import numpy as np
from onnx_mbs.bridge.loading import as_samples, load_batches, rank_batches

# The worker starts late, and this process is killed outright the moment it has forked it.
os.register_at_fork(after_in_child=lambda: time.sleep(1))
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGKILL))
x = np.zeros((8, 3, 4, 4), np.float32)
samples = as_samples((x, np.zeros(8, np.int64)), "data")
for _ in load_batches(samples, rank_batches(8, 0, 0, 0, 1, 2, 4), None, 0, 1):
    pass
"""


def test_a_worker_whose_process_died_before_it_started_ends() -> None:
    """A data-loader worker whose process (a rank killed by a test, or by hand) died before
    the worker got going took the reaper for its parent and waited for batches for ever: the
    orphan `onnx-mbs retrain --resume` found 39 minutes after a slow-suite run. It ends."""
    import sys

    with processes.started([sys.executable, "-c", _KILLED_AS_A_WORKER_IS_FORKED]) as job:
        assert job.wait(timeout=120) == -signal.SIGKILL
        assert processes.left(job.tag, timeout=30) == []


def test_crop_with_padding_and_flip() -> None:
    pre = Preprocess((8, 8), 1, (0.5,), (0.25,))
    recipe = choose_augment("standard", (1, 1, 8, 8), pre)
    assert recipe == Augment(size=(8, 8), pad=1, fill=(-2.0,), layout="NCHW")
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    out = recipe(x, np.array([10, 11]), seed=0, epoch=0)
    assert out.shape == x.shape and out.dtype == np.float32
    for k, index in enumerate((10, 11)):
        # Every output is a shifted (and maybe mirrored) window of the black-padded input.
        padded = np.pad(x[k, 0], 1, constant_values=-2.0)
        windows = [
            w
            for dy in range(3)
            for dx in range(3)
            for w in (padded[dy : dy + 8, dx : dx + 8], padded[dy : dy + 8, dx : dx + 8][:, ::-1])
        ]
        assert any(np.array_equal(out[k, 0], w) for w in windows)
        # A sample is augmented by its own (seed, epoch, index), whatever batch it is in.
        alone = recipe(x[k : k + 1], np.array([index]), seed=0, epoch=0)
        np.testing.assert_array_equal(alone[0], out[k])
    flips = [recipe(x[:1], np.array([i]), 0, 0) for i in range(40)]
    assert any(np.array_equal(f[0, 0, 1:7, 1:7], x[0, 0, 1:7, 1:7][:, ::-1]) for f in flips)
    nhwc = choose_augment(
        "standard", (1, 8, 8, 1), Preprocess((8, 8), 1, (0.0,), (1.0,), layout="NHWC")
    )
    np.testing.assert_array_equal(
        nhwc(x.transpose(0, 2, 3, 1), np.array([10, 11]), 0, 0),
        Augment((8, 8), 1, (0.0,))(x, np.array([10, 11]), 0, 0).transpose(0, 2, 3, 1),
    )


def test_large_inputs_get_a_random_resized_crop() -> None:
    recipe = choose_augment("standard", (1, 3, 96, 96), Preprocess((96, 96), 3, (0,) * 3, (1,) * 3))
    assert recipe.pad == 0 and "random resized crop" in recipe.describe()
    x = np.random.default_rng(0).random((3, 3, 96, 96), dtype=np.float32)
    out = recipe(x, np.arange(3), seed=1, epoch=2)
    assert out.shape == x.shape and not np.allclose(out, x)
    assert choose_augment("auto", (1, 1, 8, 8), None) is None  # arrays given as model inputs
    assert choose_augment("auto", (1, 16), Preprocess((8, 8), 1, (0,), (1,))) is None
    with pytest.raises(BadInputError, match="use augment=.none."):
        choose_augment("standard", (1, 16), None)


def test_schedule_warms_up_then_decays_by_cosine() -> None:
    factors = [lr_factor(s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert lr_factor(0, 100, 0) == 1.0 and lr_factor(100, 100, 0) == pytest.approx(0.0)
    assert default_lr(64) == 0.01 and default_lr(256) == 0.04


def test_a_warmup_that_leaves_no_decay_is_refused() -> None:
    """The first step after the warm-up runs at the peak: a warm-up that leaves the cosine
    fewer than 2 steps never lowers the learning rate. Refused before any training."""
    x, y = quadrant_data(64, seed=1)
    for warmup in (0.99, 0.5):  # 2 and 1 of the 2 steps
        with pytest.raises(BadInputError, match="learning rate would never fall below its peak"):
            retrain(export(keep_bn=True), (x, y), warmup=warmup, batch_size=32, progress=False)


def test_a_batch_the_processes_do_not_divide_is_refused(monkeypatch) -> None:
    """Each of K processes takes batch // K: a --batch-size K does not divide trained on a
    smaller global batch than the one the default learning rate was scaled for. Refused
    before any process group is made (so one process suffices to see it)."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    x, y = quadrant_data(64, seed=1)
    for batch in (32, 2):
        refused = f"batch_size={batch} is the global batch, .* 3 processes: give a multiple of 3"
        with pytest.raises(BadInputError, match=refused):
            retrain(export(keep_bn=True), (x, y), batch_size=batch, progress=False)


def test_defaults_and_what_ran_are_reported(npz) -> None:
    x, y = quadrant_data(64, seed=1)
    result = retrain(export(keep_bn=True), (x, y), batch_size=16, device="cpu", progress=False)
    assert result.augment == "none"  # arrays given as model inputs
    assert "lr 0.0025" in result.schedule and "warm-up 0 of 4 steps" in result.schedule
    smoothed = retrain(
        export(keep_bn=True),
        (x, y),
        batch_size=16,
        device="cpu",
        progress=False,
        label_smoothing=0.2,
        warmup=0.5,
    )
    assert "label smoothing 0.2" in smoothed.schedule and "warm-up 2 of 4" in smoothed.schedule
    # Smoothed targets cannot reach the unsmoothed loss's floor: the losses differ.
    assert smoothed.history[0].train_loss != result.history[0].train_loss


def test_each_epoch_line_is_written_when_the_epoch_ends(npz, tmp_path, monkeypatch, capsys) -> None:
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupt):
        retrain(
            export(keep_bn=True),
            source(npz),
            epochs=3,
            batch_size=32,
            device="cpu",
            checkpoint=tmp_path,
            workers=0,
        )
    err = capsys.readouterr().err
    assert "augmentation: standard: random 8x8 crop" in err
    line = next(li for li in err.splitlines() if li.startswith("epoch 1/3: "))
    assert "loss " in line and "train acc " in line and "images/s" in line and "ETA " in line
    assert "epoch 2/3" not in err


def test_epoch_line_without_labels_says_agreement_not_accuracy(capsys) -> None:
    """Without labels the training 'accuracy' is agreement with the teacher's top-1."""
    x, _ = quadrant_data(64, seed=1)
    retrain(
        export(keep_bn=True),
        (x, None),
        teacher=export(keep_bn=True, seed=3),
        batch_size=32,
        device="cpu",
        progress=True,
    )
    line = next(li for li in capsys.readouterr().err.splitlines() if li.startswith("epoch 1/1"))
    assert "train agreement with the teacher " in line and "train acc" not in line, line


def test_unlabelled_validation_picks_the_best_epoch_by_agreement() -> None:
    x, y = quadrant_data(128, seed=1)
    xv, _ = quadrant_data(64, seed=2)
    teacher = export(keep_bn=True, seed=3)
    result = retrain(
        export(keep_bn=True),
        (x, y),
        (xv, None),
        teacher=teacher,
        epochs=3,
        lr=0.05,
        batch_size=32,
        device="cpu",
        progress=False,
    )
    agreements = [e.val_agreement for e in result.history]
    assert all(math.isnan(e.val_top1) for e in result.history)
    assert result.best_epoch == int(np.argmax(agreements))
    ours = run(result.model, {"input": xv})[0].argmax(1)
    theirs = run(teacher, {"input": xv})[0].argmax(1)
    assert result.best_val_agreement == pytest.approx(float((ours == theirs).mean()))
    with pytest.raises(BadInputError, match="validation data has no labels"):
        retrain(export(keep_bn=True), (x, y), (xv, None), progress=False)


@pytest.mark.slow
def test_torchrun_resumes_after_a_kill(npz, tmp_path) -> None:
    """Two processes, killed once the first epoch's checkpoint is there (rank 0 writes it),
    resumed with the same command: the weights of an uninterrupted two-process run."""
    import os
    import subprocess
    import sys
    import time

    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: str, directory: str) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "onnx_mbs", "retrain", str(model), "-o", str(tmp_path / out), "--data",
            str(npz), "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--workers", "1",
            "--checkpoint", str(tmp_path / directory), "--resume",
        ]  # fmt: skip

    whole = processes.run(command("whole.onnx", "a"), env=env, capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-3000:]
    target = ckpt.path_in(tmp_path / "b")
    with processes.started(command("cut.onnx", "b"), env=env, stderr=subprocess.DEVNULL) as job:
        while not target.exists() and job.poll() is None:
            time.sleep(0.05)
        # Every process of the run, ranks and data-loader workers, whatever their session.
        processes.kill_all(job.tag)
        job.wait(timeout=60)
    assert not (tmp_path / "cut.onnx").exists()
    done = torch.load(target, weights_only=True)["epoch"]
    resumed = processes.run(command("cut.onnx", "b"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {target} after epoch {done}" in resumed.stderr
    expected, got = (
        weights(onnx.load(tmp_path / "whole.onnx")),
        weights(onnx.load(tmp_path / "cut.onnx")),
    )
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.slow
def test_the_ranks_end_when_torchrun_is_killed(npz, tmp_path) -> None:
    """torchrun killed outright (SIGKILL, the OOM killer, a job's clean-up) cannot stop its
    ranks, which run in sessions of their own: they trained on for nobody, with their
    data-loader workers. Each rank now ends as on SIGTERM: one line, nothing written, every
    finished epoch kept in the checkpoint, no process left."""
    import os
    import sys
    import time

    model = tmp_path / "m.onnx"
    onnx.save(export(keep_bn=True), model)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "onnx_mbs", "retrain", str(model), "-o", str(tmp_path / "out.onnx"), "--data",
        str(npz), "--epochs", "100000", "--batch-size", "16", "--device", "cpu", "--workers",
        "1", "--checkpoint", str(tmp_path / "c"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    target = ckpt.path_in(tmp_path / "c")
    err = (tmp_path / "err").open("w")
    with err, processes.started(command, env=env, stderr=err) as job:
        while not target.exists() and job.poll() is None:
            time.sleep(0.05)
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
        assert processes.left(job.tag, timeout=60) == []
    lines = (tmp_path / "err").read_text()
    assert lines.count("onnx-mbs: terminated; nothing written") == 2, lines[-3000:]
    assert f"{tmp_path / 'c'} holds every finished epoch" in lines, lines[-3000:]
    # None of ours. Left alone: now and then a rank's multiprocessing.resource_sharer thread
    # (file descriptors passed by its data-loader worker) prints its EOFError as the rank ends.
    tracebacks = lines.split("Traceback (most recent call last):")[1:]
    assert all("multiprocessing/resource_sharer.py" in t[:300] for t in tracebacks), lines[-3000:]
    assert not (tmp_path / "out.onnx").exists()
    assert torch.load(target, weights_only=True)["epoch"] >= 0


_RANKS_SEE_OTHER_CHECKPOINTS = """
import os, sys
import numpy as np, onnx, torch
sys.path.insert(0, {tests!r})
from test_retrain import export, quadrant_data
from onnx_mbs.bridge import retrain
from onnx_mbs.passes.errors import BadInputError

torch.set_num_threads(1)
rank = int(os.environ["RANK"])
x, y = quadrant_data(64, 1)
shared = sys.argv[2] == "shared"  # else each rank has a DIR of its own, as on its node's disk
try:
    retrain(export(keep_bn=True), (x, y), epochs=2, batch_size=16, device="cpu", progress=False,
            workers=0, checkpoint=sys.argv[1] + ("" if shared else str(rank)), resume=True)
except BadInputError as error:
    print(f"rank {{rank}}: {{error}}", flush=True)
    os._exit(2)
os._exit(0)
"""


@pytest.mark.slow
def test_ranks_that_see_other_checkpoints_are_refused(tmp_path) -> None:
    """Every rank reads the checkpoint on resume: where DIR is not shared (a node's own disk),
    rank 0 found all epochs done and rank 1 started at epoch 1, and the two waited on each
    other's collectives for ever. Both now stop, saying so."""
    import os
    import subprocess
    import sys

    script = tmp_path / "job.py"
    script.write_text(_RANKS_SEE_OTHER_CHECKPOINTS.format(tests=str(Path(__file__).parent)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Both epochs into c0, which rank 0 sees on resume; rank 1 sees c1, empty.
    first = processes.run([*command, str(tmp_path / "c0"), "shared"], env=env)
    assert first.returncode == 0
    command += [str(tmp_path / "c"), "own"]
    with processes.started(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as job:
        try:
            out = job.communicate(timeout=180)[0]
        except subprocess.TimeoutExpired:
            pytest.fail("the ranks waited on each other until killed")
    assert job.returncode != 0
    assert "rank 0: " in out and "not every process" in out, out[-3000:]


def test_a_checkpoint_from_before_sliced_weights_trained_is_refused(npz, tmp_path) -> None:
    """Weights read through Slice/Split/Gather/Expand train now; a checkpoint written when they
    did not holds no value for them, and resuming from it failed in load_state_dict with a
    traceback. The fingerprint names them (only where there are any: every other run's
    checkpoint resumes as before), so such a checkpoint is refused in one line."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = {
        "big": rng.normal(0, 0.3, (6, 1, 3, 3)).astype(np.float32),
        "starts": np.array([1]),
        "ends": np.array([5]),
        "axes": np.array([0]),
        "h": rng.normal(0, 0.3, (4, 4)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Slice", ["big", "starts", "ends", "axes"], ["w"]),
            helper.make_node("Conv", ["x", "w"], ["a"], pads=[1] * 4),
            helper.make_node("GlobalAveragePool", ["a"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "h"], ["y"], transB=1),
        ],
        "sliced",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x, y = quadrant_data(32, seed=0)
    common = dict(epochs=2, batch_size=16, device="cpu", progress=False, workers=0)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Interrupt):
            retrain(model, (x, y), checkpoint=tmp_path / "s", **common)
    state = torch.load(ckpt.path_in(tmp_path / "s"), weights_only=True)
    assert state["fingerprint"]["indexed weights"] == ["big"]
    del state["fingerprint"]["indexed weights"]  # as written before
    del state["student"]["big"]
    torch.save(state, ckpt.path_in(tmp_path / "s"))
    resume = dict(checkpoint=tmp_path / "s", resume=True, **common)
    with pytest.raises(BadInputError, match=r"differs in: indexed weights\)"):
        retrain(model, (x, y), **resume)
    # A model with no such weight: the fingerprint is what it was.
    plain = stopped_after_one_of_two_epochs(npz, tmp_path / "p", common)
    state = torch.load(ckpt.path_in(plain), weights_only=True)
    assert "indexed weights" not in state["fingerprint"]


def test_only_folders_the_run_made_are_removed_whatever_the_path_spells(
    tmp_path, monkeypatch
) -> None:
    """`new/../theirs` names the user's empty folder `theirs` through a folder `new` that did
    not exist: it was taken for a folder the run made (a lexical parent of a missing one does not
    exist) and removed when the run stopped; `.` and a relative path are the same folders."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "theirs").mkdir()
    made = ckpt.prepare("new/../theirs")
    ckpt.remove_made(made)
    assert (tmp_path / "theirs").is_dir()
    assert not (tmp_path / "new").exists()
    assert ckpt.prepare(".") == []
    ckpt.remove_made(ckpt.prepare("rel/ck"))
    assert list(tmp_path.iterdir()) == [tmp_path / "theirs"]


RESUMED = {
    "bn-folded, re-inserted": dict(keep_bn=False),
    "bn-folded, teacher's statistics": dict(keep_bn=False, teacher=True),
    "warm-up, adamw": dict(warmup=0.4, optimizer="adamw"),
    "label-free, teacher only": dict(teacher=True, labels=False),
    "frozen weights and statistics": dict(freeze=["bn.weight", "bn.running_mean"]),
}


@pytest.mark.parametrize("case", list(RESUMED))
def test_resumed_equals_uninterrupted_for_each_kind_of_run(case, tmp_path, monkeypatch) -> None:
    """Stopped after epoch 1 and resumed, each kind of run writes the uninterrupted run's
    weights, bit for bit (CPU, same seed)."""
    spec = dict(RESUMED[case])
    keep_bn = spec.pop("keep_bn", True)
    teacher = export(keep_bn=keep_bn, seed=3) if spec.pop("teacher", False) else None
    x, y = quadrant_data(90, seed=1)
    data = (x, y if spec.pop("labels", True) else None)
    common = dict(teacher=teacher, epochs=3, batch_size=16, lr=0.05, seed=5, device="cpu")
    common.update(progress=False, **spec)
    expected = weights(retrain(export(keep_bn=keep_bn), data, **common).model)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Interrupt):
            retrain(export(keep_bn=keep_bn), data, checkpoint=tmp_path, **common)
    resumed = retrain(export(keep_bn=keep_bn), data, checkpoint=tmp_path, resume=True, **common)
    assert resumed.resumed_from == 1
    got = weights(resumed.model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)

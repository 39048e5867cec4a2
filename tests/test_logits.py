"""Which output is the classifier's logits: one rule for eval, retrain and the label check;
probabilities (a Softmax output) train on the Softmax's input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from conftest import write_npz
from onnx import TensorProto, helper
from test_retrain import quadrant_data
from test_runtime import CPU, Logits
from torch import nn

from onnx_mbs.bridge import retrain
from onnx_mbs.cli import main
from onnx_mbs.data.fit import check_labels
from onnx_mbs.evaluate import evaluate
from onnx_mbs.logits import argmax_inputs, choose_logits, declared_shapes
from onnx_mbs.models.export import export_onnx
from onnx_mbs.passes.errors import BadInputError

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _out(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def scores_model(heads: str, classes: int = 10) -> onnx.ModelProto:
    """The data's rows as scores z = Flatten(x), exported as `heads` says (in that order):
    'emb' (batch, 2K) = [z, -z], 'logits' z, 'probs' Softmax(z), 'logp' LogSoftmax(z),
    'nk11' z as (batch, K, 1, 1), 'n1k' z as (batch, 1, K), 'binary' (batch, 1)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 1, classes])
    nodes = [
        helper.make_node("Flatten", ["x"], ["z"]),
        helper.make_node("Neg", ["z"], ["nz"]),
        helper.make_node("Concat", ["z", "nz"], ["emb"], axis=1),
        helper.make_node("Identity", ["z"], ["logits"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        helper.make_node("LogSoftmax", ["z"], ["logp"], axis=1),
        helper.make_node("Unsqueeze", ["z", "axes"], ["nk11"]),
        helper.make_node("Unsqueeze", ["z", "one"], ["n1k"]),
        helper.make_node("ReduceSum", ["z", "one"], ["binary"], keepdims=1),
    ]
    dims = {
        "emb": ["n", 2 * classes],
        "logits": ["n", classes],
        "probs": ["n", classes],
        "logp": ["n", classes],
        "nk11": ["n", classes, 1, 1],
        "n1k": ["n", 1, classes],
        "binary": ["n", 1],
    }
    inits = [
        helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
    ]
    outputs = [_out(h, dims[h]) for h in heads.split()]
    graph = helper.make_graph(nodes, "scores", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def answers(n: int = 6, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose argmax is the label for the first half, and wrong for the rest."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, n)
    scores = rng.normal(size=(n, classes)).astype(np.float32)
    for i, c in enumerate(labels):
        scores[i, c if i < n // 2 else (c + 1) % classes] = 10.0
    return scores, labels


# --------------------------------------------------------------------------- the rule


def test_one_rule_picks_the_logits_or_refuses_in_one_line() -> None:
    def pick(heads: str, chosen: str | None = None) -> str | None:
        m = scores_model(heads)
        return choose_logits(declared_shapes(m), m, chosen)

    assert pick("logits") == "logits"
    assert pick("nk11") == "nk11"  # a 1x1-Conv head without Flatten
    assert pick("probs logits") == "logits"  # the Softmax of another output gives way
    assert pick("logp logits") == "logits"  # so does its LogSoftmax
    assert pick("emb logits", "logits") == "logits"
    with pytest.raises(BadInputError, match=r"2 classifier-shaped outputs \('emb' \(batch, 20\)"):
        pick("emb logits")
    with pytest.raises(BadInputError, match="logits=.OUTPUT."):
        pick("emb logits")
    with pytest.raises(BadInputError, match="no classifier output .* binary"):
        pick("binary")
    # a (batch, 1, K) output is no (batch, 1) score: the refusal does not call it binary
    with pytest.raises(BadInputError, match=r"among its outputs \('n1k' \(batch, 1, 10\)\)$"):
        pick("n1k")
    with pytest.raises(BadInputError, match="names output 'nope' the model does not have"):
        pick("logits", "nope")
    with pytest.raises(BadInputError, match=r"'binary' \(batch, 1\) is not a classifier's"):
        pick("logits binary", "binary")


# --------------------------------------------------------------------------- eval


def test_eval_reads_the_logits_not_the_first_output() -> None:
    scores, labels = answers()
    data = Logits(scores, labels)
    with pytest.raises(BadInputError, match="classifier-shaped outputs"):
        evaluate(scores_model("emb logits"), data, CPU, progress=False)
    chosen = evaluate(scores_model("emb logits"), data, CPU, progress=False, logits="logits")
    for heads in ("logits", "probs logits", "probs", "logp", "nk11"):
        result = evaluate(scores_model(heads), data, CPU, progress=False)
        assert result.top1 == pytest.approx(0.5), heads
    assert chosen.top1 == pytest.approx(0.5)


def test_eval_refuses_a_binary_score() -> None:
    scores, _ = answers()
    with pytest.raises(BadInputError, match="binary"):
        evaluate(scores_model("binary"), Logits(scores, np.zeros(6, int)), CPU, progress=False)


class _Labelled:
    description = "npz labels.npz: 6 samples"

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels


def test_labels_are_checked_against_the_logits_output() -> None:
    # The first output has 20 columns; the logits 10: label 15 names no class.
    model = scores_model("emb logits")
    check_labels(_Labelled(np.array([0, 15])), model)  # which output is not known yet
    with pytest.raises(BadInputError, match="label 15 .* logits 'logits' have 10 classes"):
        check_labels(_Labelled(np.array([0, 15])), model, logits="logits")
    with pytest.raises(BadInputError, match="label 15 .* 'probs' have 10 classes"):
        check_labels(_Labelled(np.array([0, 15])), scores_model("probs"))
    check_labels(_Labelled(np.array([0, 1])), scores_model("binary"))  # eval says why


def test_label_refusal_names_the_data_past_a_drive_letter(tmp_path) -> None:
    """The data was named by its description cut at the first ':', so an image folder under
    D:\\ was 'image folder D'."""
    import re

    from test_data import pixels, write_png

    from onnx_mbs.data import open_data

    root = tmp_path / "D:" / "imgs"
    for k in range(11):  # labels 0..10 for a model of 10 classes
        write_png(root / f"{k:02d}" / "0.png", pixels(1, 1, 10, seed=k)[0])
    source = open_data(root, "x", (1, 1, 1, 10))
    where = re.escape(f"image folder {root} (11 classes)")
    with pytest.raises(BadInputError, match=rf"label 10 in {where} does not exist"):
        check_labels(source, scores_model("logits"))


# --------------------------------------------------------------------------- retrain


class QuadNet(nn.Module):
    """Logits, or what a Keras/Caffe export gives: probabilities, log-probabilities, or the
    logits as (batch, classes, 1, 1); 'emb' also returns the features before them, first;
    'derived' the logits, their Softmax, LogSoftmax and ArgMax."""

    def __init__(self, head: str = "logits") -> None:
        super().__init__()
        self.head = head
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor):
        features = torch.flatten(torch.relu(self.conv(x)), 1)
        z = self.fc(features)
        if self.head == "probs":
            return torch.softmax(z, 1)
        if self.head == "logp":
            return torch.log_softmax(z, 1)
        if self.head == "nk11":
            return z[:, :, None, None]
        if self.head == "emb":
            return features, z
        if self.head == "derived":
            return z, torch.softmax(z, 1), torch.log_softmax(z, 1), z.argmax(1)
        return z


def quadnet(head: str = "logits", seed: int = 0) -> onnx.ModelProto:
    torch.manual_seed(seed)
    names = {"emb": ("features", "logits"), "derived": ("out", "probs", "logp", "pred")}
    names = names.get(head, ("out",))
    return export_onnx(QuadNet(head), (1, 1, 8, 8), dynamic_batch=True, output_names=names)


KW = dict(epochs=1, lr=0.05, batch_size=32, device="cpu", progress=False, augment="none")


@pytest.fixture(scope="module")
def train() -> tuple[np.ndarray, np.ndarray]:
    return quadrant_data(128, seed=1)


def _losses(result) -> list[float]:
    return [h.train_loss for h in result.history]


@pytest.mark.parametrize("head", ["probs", "logp", "nk11"])
def test_probabilities_train_as_their_logits(train, head) -> None:
    """Cross-entropy on a Softmax output's input, on log-probabilities and on (N, K, 1, 1)
    logits is the plain model's: the same losses, step for step."""
    plain = retrain(quadnet(), train, None, **KW)
    other = retrain(quadnet(head), train, None, **KW)
    assert _losses(other) == pytest.approx(_losses(plain), rel=1e-4)
    assert other.history[0].train_acc == plain.history[0].train_acc


@pytest.mark.parametrize("head", ["probs", "logp"])
def test_probabilities_distil_as_their_logits(train, head) -> None:
    """Temperature KL (and the pseudo-label CE without labels) on the teacher's and student's
    Softmax inputs: the plain model's losses."""
    x = (train[0], None)
    plain = retrain(quadnet(), x, None, teacher=quadnet(seed=1), **KW)
    other = retrain(quadnet(head), x, None, teacher=quadnet(head, seed=1), **KW)
    assert other.losses == {"out": "kl"}
    assert _losses(other) == pytest.approx(_losses(plain), rel=1e-4)


@pytest.mark.parametrize("labelled", [True, False])
def test_a_classifier_exported_with_its_softmax_and_argmax_distils_once(
    train, labelled, tmp_path, capsys
) -> None:
    """Logits exported beside their Softmax, LogSoftmax and ArgMax: each output's KL read the
    logits (the Softmax's input, the scores the ArgMax reads) or log-probabilities (the same
    KL: softmax ignores a per-row shift), so one classifier's distillation was counted four
    times, four times distill_alpha's weight against the cross-entropy (on labels, or the
    teacher's argmax without). A term another output's repeats counts once: the losses are
    the logits-alone model's, step for step, and the printed line says so."""
    x = train if labelled else (train[0], None)
    plain = retrain(quadnet(), x, None, teacher=quadnet(seed=1), **KW)
    derived = retrain(quadnet("derived"), x, None, teacher=quadnet("derived", seed=1), **KW)
    assert derived.losses == {"out": "kl", "probs": "kl", "logp": "kl", "pred": "kl"}
    assert derived.shared == {"probs": "out", "logp": "out", "pred": "out"}
    assert _losses(derived) == pytest.approx(_losses(plain), rel=1e-4)
    if not labelled:
        return
    paths = [tmp_path / f"{seed}.onnx" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        onnx.save(quadnet("derived", seed), path)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    args = ["retrain", str(paths[0]), "-o", str(tmp_path / "o.onnx"), "--data", data]
    assert main([*args, "--teacher", str(paths[1]), "--epochs", "1", "--augment", "none"]) == 0
    said = (
        "distillation: out=kl, probs=kl (the same as out: counted once), logp=kl (the same as "
        "out: counted once), pred=kl on the class scores its ArgMax reads (the same as out: "
        "counted once) (chosen by its shape"
    )
    assert said in capsys.readouterr().err


def _with_decisions(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with two more outputs of its logits' (batch, 4) shape holding no scores: its
    positive classes (bool, a multi-label decision) and their count per class as int32."""
    g = model.graph
    g.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "zero"))
    g.node.extend([helper.make_node("Greater", ["out", "zero"], ["pos"]),
                   helper.make_node("Cast", ["pos"], ["votes"], to=TensorProto.INT32)])  # fmt: skip
    g.output.extend(
        helper.make_tensor_value_info(n, t, ["batch", 4])
        for n, t in (("pos", TensorProto.BOOL), ("votes", TensorProto.INT32))
    )
    return model


def test_integer_and_boolean_outputs_are_never_logits(train, tmp_path, capsys) -> None:
    """A (batch, classes) bool or integer output beside the logits (a multi-label decision)
    holds no scores, but was counted as a classifier output by its shape: labelled `eval` and
    `retrain` were refused until `--logits` named the logits, `--logits pos` was taken, and
    `eval --teacher` gave it a top-1 agreement, the argmax of booleans. Only float outputs are
    logits."""
    model = _with_decisions(quadnet())
    shapes = declared_shapes(model)
    assert choose_logits(shapes, model) == "out"
    with pytest.raises(BadInputError, match=r"'pos' \(batch, 4\) holds bool values"):
        choose_logits(shapes, model, "pos")
    path = str(tmp_path / "m.onnx")
    onnx.save(model, path)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    assert main(["eval", path, "--data", data, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == "out"
    assert main(["eval", path, "--data", data, "--teacher", path, "--json"]) == 0
    outputs = json.loads(capsys.readouterr().out)["outputs"]
    assert outputs["out"]["top1"] == 1.0
    assert outputs["pos"]["top1"] is None and outputs["votes"]["top1"] is None
    assert retrain(model, train, None, **KW).logits == "out"


def test_retrain_refuses_to_guess_between_classifier_shaped_outputs(train) -> None:
    model = quadnet("emb")
    with pytest.raises(BadInputError, match=r"2 classifier-shaped outputs .*logits=.OUTPUT."):
        retrain(model, train, None, **KW)
    chosen = retrain(model, train, None, logits="logits", **KW)
    # A teacher alone distils every output; no output's argmax stands in for labels.
    distilled = retrain(model, (train[0], None), None, teacher=quadnet("emb", seed=1), **KW)
    assert not distilled.labels_used
    plain = retrain(quadnet(), train, None, **KW)
    assert _losses(chosen) == pytest.approx(_losses(plain), rel=1e-4)


def test_retrain_refuses_labels_beyond_the_classes(train) -> None:
    x, y = train
    with pytest.raises(BadInputError, match="label 7 in the training data does not exist"):
        retrain(quadnet(), (x, np.where(y == 3, 7, y)), None, **KW)


def test_cli_logits_option(tmp_path, train, capsys) -> None:
    path = str(tmp_path / "emb.onnx")
    onnx.save(quadnet("emb"), path)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    assert main(["eval", path, "--data", data]) == 2
    assert "--logits OUTPUT" in capsys.readouterr().err
    assert main(["eval", path, "--data", data, "--logits", "logits", "--json"]) == 0
    assert main(["eval", path, "--data", data, "--teacher", path, "--logits", "logits"]) == 2
    assert "eval --teacher compares every output" in capsys.readouterr().err
    out = str(tmp_path / "out.onnx")
    assert main(["retrain", path, "-o", out, "--data", data, "--epochs", "1"]) == 2
    assert "--logits OUTPUT" in capsys.readouterr().err
    args = ["retrain", path, "-o", out, "--data", data, "--logits", "logits", "--augment", "none"]
    assert main([*args, "--epochs", "1"]) == 0


# --------------------------------------------------------------------------- reduce


def test_reduce_reports_top1_of_the_logits_or_none_for_a_detector(tmp_path, train) -> None:
    from graphs import yolov8_c2f_like

    from onnx_mbs.pipeline import reduce

    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    with pytest.raises(BadInputError, match="2 classifier-shaped outputs"):
        reduce(quadnet("emb"), data, progress=False)
    _, report = reduce(quadnet("emb"), data, progress=False, logits="logits")
    assert set(report.accuracy) == {"before", "after"}
    # A detector with labelled data: no top-1 to take, and the reduction is not lost.
    detector = yolov8_c2f_like()
    dims = [d.dim_value for d in detector.graph.input[0].type.tensor_type.shape.dim]
    images = np.random.default_rng(0).integers(0, 256, (4, *dims[1:]), dtype=np.uint8)
    data = write_npz(tmp_path / "det.npz", x=images, y=np.zeros(4, int))
    _, report = reduce(detector, data, progress=False)
    assert report.accuracy == {}
    assert report.no_top1.startswith("no top-1: the model has no classifier output")


def test_reduce_says_why_a_detector_with_labels_gets_no_top1(tmp_path, capsys) -> None:
    """Labelled data and a model whose outputs are not classifier-shaped: the top-1 lines
    were left out without a word; one line says why, on the command line and in the
    report."""
    from graphs import yolov8_c2f_like

    detector = tmp_path / "det.onnx"
    onnx.save(yolov8_c2f_like(), detector)
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    data = write_npz(tmp_path / "det.npz", x=images, y=np.zeros(4, int))
    out = tmp_path / "small.onnx"
    args = ["reduce", str(detector), "-o", str(out), "--data", str(data)]
    assert main([*args, "--report", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    (line,) = [x for x in printed.splitlines() if x.startswith("no top-1")]
    assert "no classifier output (batch, classes)" in line and "'" in line
    assert "eval --teacher" in line
    assert line in (tmp_path / "report" / "report.md").read_text()
    assert main([*args, "--no-eval"]) == 0  # asked for no top-1: nothing to explain
    assert "no top-1" not in capsys.readouterr().out


def test_reduce_no_top1_line_follows_logits_none(tmp_path, train, monkeypatch) -> None:
    """reduce explained a missing top-1 by the model's shapes alone (`no_top1` without
    `logits`): "the model has no classifier output (batch, classes) among its outputs 'out'
    (batch, 4)", false where 'out' is classifier-shaped and `logits="none"` set it aside.
    `--logits none` reads no labels, so the line is not reached today; the data is opened
    with its labels here to hold the two together."""
    from onnx_mbs import pipeline
    from onnx_mbs.data.fit import open_for_model

    def with_labels(data, model, options):
        return open_for_model(data, model, mean=options.mean, std=options.std)

    monkeypatch.setattr(pipeline, "fit_data", with_labels)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    _, report = pipeline.reduce(quadnet(), data, progress=False, logits="none")
    assert report.accuracy == {}
    assert report.no_top1.startswith("no top-1: logits='none' says the model has no classifier")


def test_agreement_takes_top1_of_a_1x1_conv_head() -> None:
    from onnx_mbs.evaluate import _Accumulator

    scores, _ = answers()
    acc = _Accumulator("nk11", (6, 10, 1, 1))
    acc.add(scores[:, :, None, None], scores[:, :, None, None])
    assert acc.result().top1 == 1.0 and acc.result().iou is None


def test_mse_chosen_for_probabilities_compares_the_probabilities(train) -> None:
    """`losses={"out": "mse"}` on a Softmax output is the squared error of the probabilities,
    as asked, not of the Softmax's input (which cross-entropy reads)."""
    x = (train[0], None)
    kw = {**KW, "losses": {"out": "mse"}, "distill_alpha": 1.0}
    probs = retrain(quadnet("probs"), x, None, teacher=quadnet("probs", seed=1), **kw)
    logits = retrain(quadnet(), x, None, teacher=quadnet(seed=1), **kw)
    # alpha 1: the loss is the MSE alone, of the probabilities here and of the logits there.
    assert _losses(probs) != pytest.approx(_losses(logits), rel=1e-3)


# --------------------------------------------------------------------------- --logits none


def test_logits_none_distils_a_regression_head_with_mse(train) -> None:
    """A (batch, 4) output is taken for logits by its shape and distilled with KL, which a
    per-sample shift does not change: `logits="none"` says it is not, and the default loss
    is the normalised MSE, the same run as asking for mse."""
    x = (train[0], None)
    guessed = retrain(quadnet(), x, None, teacher=quadnet(seed=1), **KW)
    assert guessed.losses == {"out": "kl"} and guessed.logits == "out"
    none = retrain(quadnet(), x, None, teacher=quadnet(seed=1), logits="none", **KW)
    assert none.losses == {"out": "mse"} and none.logits is None and not none.labels_used
    # `losses={"out": "mse"}` alone still trained the teacher's argmax of the box as a class
    # (pseudo-label cross-entropy): with its weight 0 it is the run `logits="none"` makes.
    asked = retrain(
        quadnet(), x, None, teacher=quadnet(seed=1), losses={"out": "mse"}, distill_alpha=1.0, **KW
    )
    assert _losses(none) == pytest.approx(_losses(asked), rel=1e-6)
    with pytest.raises(BadInputError, match="logits='none' says the model has none"):
        retrain(
            quadnet(), x, None, teacher=quadnet(seed=1), logits="none", losses={"out": "kl"}, **KW
        )
    # Labels and no teacher: nothing the labels could train.
    with pytest.raises(BadInputError, match=r"no classifier output \(logits='none'\)"):
        retrain(quadnet(), train, None, logits="none", **KW)


def test_logits_none_refuses_a_top1_and_skips_argmax_agreement() -> None:
    from onnx_mbs.evaluate import agreement

    scores, labels = answers()
    data, model = Logits(scores, labels), scores_model("logits")
    with pytest.raises(BadInputError, match="logits='none' says the model has no classifier"):
        evaluate(model, data, CPU, progress=False, logits="none")
    assert evaluate(model, data, CPU, progress=False).output == "logits"
    (guessed,) = agreement(model, model, data, CPU, progress=False).outputs
    (none,) = agreement(model, model, data, CPU, progress=False, logits="none").outputs
    assert guessed.top1 == 1.0 and none.top1 is None and none.cosine == pytest.approx(1.0)


def test_val_with_logits_none_says_why_and_what_to_do(tmp_path, train, capsys) -> None:
    """`retrain --val` picks the best epoch by a top-1: against the labels, or the teacher's
    argmax without them; `--logits none` leaves no output to take one from, so the teacher's
    outputs do not make it possible. The refusal said "validation top-1 needs a classifier
    output ...: train without validation data", also with an unlabelled --val and a teacher;
    it now says what --val measures and how to compare the result with the original."""
    x = (train[0], None)
    with pytest.raises(BadInputError, match=r"val_data picks the best epoch by top-1.*"
                       r"onnx_mbs\.evaluate\.agreement"):  # fmt: skip
        retrain(quadnet(), x, x, teacher=quadnet(seed=1), logits="none", **KW)
    path, out = str(tmp_path / "m.onnx"), tmp_path / "out.onnx"
    onnx.save(quadnet(), path)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    val = write_npz(tmp_path / "v.npz", x=pixels)
    argv = ["retrain", path, "-o", str(out), "--data", data, "--teacher", path, "--val", val]
    assert main([*argv, "--logits", "none", "--augment", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("onnx-mbs: error: --val picks the best epoch by top-1"), err
    assert "(--logits none)" in err[-1] and "leave --val out to keep the last epoch" in err[-1]
    assert "onnx-mbs eval OUTPUT --teacher ORIGINAL --data VAL --logits none" in err[-1]
    assert "epoch 1/" not in "".join(err) and not out.exists()


def test_cli_logits_none(tmp_path, train, capsys) -> None:
    """eval: a labelled top-1 refused in one line, agreement without argmax top-1; the line of
    a guess names the output taken; reduce reads labels beyond the (batch, 4) output's range."""
    path, teacher = str(tmp_path / "m.onnx"), str(tmp_path / "t.onnx")
    onnx.save(quadnet(), path)
    onnx.save(quadnet(seed=1), teacher)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    assert main(["eval", path, "--data", data]) == 0
    assert "of output 'out' (chosen by its shape" in capsys.readouterr().out
    assert main(["eval", path, "--data", data, "--logits", "none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--logits none says the model has no classifier output" in err[0]
    args = ["eval", path, "--data", data, "--teacher", teacher, "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["out"]["top1"] is not None
    assert main([*args, "--logits", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["outputs"]["out"]["top1"] is None
    out = str(tmp_path / "out.onnx")
    retrain_args = [
        "retrain",
        path,
        "-o",
        out,
        "--data",
        data,
        "--teacher",
        teacher,
        "--no-labels",
        "--epochs",
        "1",
        "--augment",
        "none",
    ]
    assert main(retrain_args) == 0
    err = capsys.readouterr().err  # the pseudo-labels' cross-entropy was left unsaid
    assert "distillation: out=kl (chosen by its shape" in err
    assert "; no labels used; + cross-entropy on the teacher's top-1 (pseudo-labels)" in err
    assert main([*retrain_args, "--logits", "none"]) == 0
    assert "distillation: out=mse; no labels used" in capsys.readouterr().err
    # Labels 0..9 for a (batch, 4) output: refused as logits, read without labels with none.
    wide = write_npz(tmp_path / "w.npz", x=pixels, y=np.arange(len(pixels)) % 10)
    reduce_args = ["reduce", path, "-o", str(tmp_path / "r.onnx"), "--data", wide]
    assert main(["reduce", path, "-o", str(tmp_path / "r.onnx"), "--data", data]) == 0
    assert "top-1 before: " in (printed := capsys.readouterr().out)
    assert "of output 'out' (chosen by its shape" in printed
    assert main(reduce_args) == 2
    assert "label 9" in capsys.readouterr().err
    assert main([*reduce_args, "--logits", "none"]) == 0
    assert "top-1" not in capsys.readouterr().out


def _renamed(model: onnx.ModelProto, old: str, new: str) -> onnx.ModelProto:
    """`model` with its output `old` (and the tensor) called `new`."""
    for node in model.graph.node:
        node.output[:] = [new if o == old else o for o in node.output]
    next(o for o in model.graph.output if o.name == old).name = new
    return model


def test_an_output_named_none_is_not_silently_taken_for_logits_none(tmp_path, train, capsys):
    """`--logits none` says no output is logits; it also spells the name of an output called
    'none', and the keyword won without a word: retrain --teacher distilled that classifier
    with mse and used no labels, reduce read no labels, eval --teacher took no argmax
    agreement. Where such an output is classifier-shaped (it could be the logits) the option
    is ambiguous and refused in one line; a 'none' output that cannot be logits leaves it the
    keyword."""
    from onnx_mbs.evaluate import agreement
    from onnx_mbs.logits import has_top1

    said = "--logits none could name it or say the model has no classifier output"
    scores, labels = answers()
    model = _renamed(scores_model("logits binary"), "logits", "none")
    with pytest.raises(BadInputError, match="classifier-shaped output 'none'"):
        choose_logits(declared_shapes(model), model, "none")
    with pytest.raises(BadInputError, match="classifier-shaped output 'none'"):
        has_top1(model, "none")
    with pytest.raises(BadInputError, match="classifier-shaped output 'none'"):
        agreement(model, model, Logits(scores, labels), CPU, progress=False, logits="none")
    with pytest.raises(BadInputError):  # refused either way: no top-1 without logits
        evaluate(model, Logits(scores, labels), CPU, progress=False, logits="none")
    assert choose_logits(declared_shapes(model), model) == "none"  # the one classifier
    binary = _renamed(scores_model("logits binary"), "binary", "none")
    assert choose_logits(declared_shapes(binary), binary, "none") is None
    assert not has_top1(binary, "none")

    path, out = str(tmp_path / "m.onnx"), tmp_path / "out.onnx"
    onnx.save(_renamed(quadnet(), "out", "none"), path)
    pixels = np.clip(train[0] * 100 + 100, 0, 255).astype(np.uint8)
    data = write_npz(tmp_path / "d.npz", x=pixels, y=train[1])
    for argv in (
        ["eval", path, "--data", data],
        ["eval", path, "--data", data, "--teacher", path],
        ["reduce", path, "-o", str(out), "--data", data],
        ["retrain", path, "-o", str(out), "--data", data, "--teacher", path, "--augment", "none"],
    ):
        assert main([*argv, "--logits", "none"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("onnx-mbs: error: the model has a classifier-shaped output")
        assert said in err[-1] and "epoch 1/" not in "".join(err) and not out.exists(), argv


def _softmax_argmax(opset: int, softmax_axis: int, argmax_axis: int) -> onnx.ModelProto:
    """Conv's (batch, 4, 8, 8) scores, a Softmax of them, its ArgMax: a label map."""
    f = TensorProto.FLOAT
    w = onnx.numpy_helper.from_array(np.ones((4, 3, 1, 1), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["p"], axis=softmax_axis),
            helper.make_node("ArgMax", ["p"], ["labels"], axis=argmax_axis),
        ],
        "g",
        [helper.make_tensor_value_info("x", f, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("labels", TensorProto.INT64, [1, 1, 8, 8])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize(
    "opset, softmax_axis, argmax_axis, trained",
    [
        (17, 1, 1, "scores"),
        (17, -3, 1, "scores"),  # the same axis of a rank-4 tensor
        (17, 1, 2, "p"),  # another axis: the Softmax does not decide the ArgMax's
        (11, 1, 1, "p"),  # opset 11's Softmax(axis=1) normalises C*H*W at once
        (11, 3, 3, "scores"),  # its last axis alone is per-position
    ],
)
def test_a_label_map_of_a_softmax_is_trained_on_the_softmaxs_input(
    opset, softmax_axis, argmax_axis, trained
):
    """An ArgMax over a Softmax's probabilities along the Softmax's axis (a segmentation
    net's `softmax(1).argmax(1)`) was trained by KL on the probabilities: softmax(p / T) of
    values in [0, 1] is nearly uniform at T = 4: the loss is some 50 times smaller than on logits.
    Its scores are the Softmax's input, as a probability output's are (`softmax_inputs`)."""
    model = _softmax_argmax(opset, softmax_axis, argmax_axis)
    assert argmax_inputs(model) == {"labels": (trained, argmax_axis)}

"""Retrain an ONNX classifier through the PyTorch bridge, optionally distilling from a teacher.

`retrain` builds an `OnnxModule`, trains it with SGD or AdamW under a cosine learning-rate
schedule, validates top-1 after every epoch and returns the ONNX model of the best epoch with
the trained weights written back into the unchanged graph. (One exception: initializers the torch
exporter tied through `Identity(initializer)` nodes are untied first -- see `untie_initializers` --
so those Identity nodes are replaced by initializers of their own.)

Loss: cross-entropy with the labels on the classifier logits (the output `onnx_mbs.logits` picks;
an output a Softmax makes is read before the Softmax);
with a teacher (an ONNX model with the same outputs, run in eval mode without gradients)
`alpha * distillation + (1 - alpha) * CE`, where distillation sums a loss per graph output (KL with
temperature for logits, variance-normalised MSE otherwise; see `losses.py`) plus, optionally, the
normalised MSE at intermediate tensors both graphs share by name (`features`). Without labels,
classifier logits take the teacher's argmax as hard labels in the CE term (bench/retrain.py: 92.71%
without labels against 92.64% with them); graphs without classifier logits
-- detector, segmenter, OCR -- retrain on the distillation term alone, on unlabelled images.

fp16/bf16 graphs train as a float32 copy (master weights) and are written back in their dtypes
(`precision.py`). BatchNorm-folded deployment graphs get a BatchNorm re-inserted after each
folded Conv for training and folded back on write-back (`bn.py`; `reinsert_bn=False` trains the
folded weights directly); with a teacher, each BN's affine is that conv's output statistics in the
teacher, as a BN-kept graph's trained affine is.

Distributed: under `torchrun --nproc_per_node=K` (WORLD_SIZE/RANK set) the module is wrapped in
DistributedDataParallel (gloo on CPU; nccl on GPUs, one per process; gloo when processes
share a GPU, which NCCL refuses). Each epoch, a seeded permutation of the
training set is split into K equal shards; `batch_size` is the global batch (each process takes
batch_size // K). Metrics are summed over processes, so every rank returns the same history and
model; callers write files from rank 0 only.

Deterministic on CPU for a given seed: parameters, shuffling (numpy generator seeded with
(seed, epoch)) and dropout (torch.manual_seed(seed + rank)) all derive from it.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.nn.functional as F

from onnx_mbs.bridge import checkpoint as ckpt
from onnx_mbs.bridge.bn import (
    Rereads,
    fold_back,
    foldable_convs,
    has_batchnorm,
    is_bn_folded,
    recalibrate,
)
from onnx_mbs.bridge.bn import reinsert_bn as reinsert_batchnorm
from onnx_mbs.bridge.freeze import check_frozen, check_not_folded, restore
from onnx_mbs.bridge.freeze import freeze as freeze_named
from onnx_mbs.bridge.loading import Samples, as_samples, load_batches, rank_batches
from onnx_mbs.bridge.losses import (
    choose_losses,
    default_losses,
    distillation_loss,
    left_out,
    normalised_mse,
    shared_terms,
)
from onnx_mbs.bridge.module import (
    OnnxModule,
    indexed_weights,
    long_axes,
    unsupported_ops,
    untie_initializers,
    untrained_line,
    way_on,
    with_outputs,
)
from onnx_mbs.bridge.precision import as_float32, is_low_precision
from onnx_mbs.bridge.writeback import write_back
from onnx_mbs.data.augment import choose_augment
from onnx_mbs.data.ready import check_teacher_input, declared_inputs, fed_type
from onnx_mbs.data.sources import default_workers
from onnx_mbs.data.spec import check_same_classes
from onnx_mbs.logits import (
    NONE,
    argmax_inputs,
    check_label_range,
    choose_logits,
    classes_of,
    classifier_outputs,
    identity_source,
    is_none,
    non_float,
    producers_of,
    softmax_input,
    softmax_inputs,
)
from onnx_mbs.passes.errors import BadInputError, option
from onnx_mbs.progress import progress_bar
from onnx_mbs.schedule import DEFAULT_WARMUP, default_lr, lr_factor


@dataclass
class EpochStats:
    """One epoch: mean training loss and accuracy (without labels, agreement with the teacher's
    top-1), validation top-1 (NaN without labelled val data) or agreement with the teacher's
    top-1 (unlabelled val data), training images/s."""

    epoch: int
    train_loss: float
    train_acc: float
    val_top1: float
    lr: float
    seconds: float
    images_per_second: float = 0.0
    val_agreement: float = math.nan


@dataclass
class RetrainResult:
    """The best epoch's model (weights written back) and how training went."""

    model: onnx.ModelProto
    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    images_per_second: float = 0.0
    device: str = "cpu"
    world_size: int = 1
    bn_reinserted: int = 0  # BatchNorms re-inserted (and folded back) for a BN-folded graph
    losses: dict[str, str] = field(default_factory=dict)  # per output, with a teacher
    # Outputs an ArgMax makes, trained on the scores it reads: {output: scores tensor}.
    scores: dict[str, str] = field(default_factory=dict)
    # Outputs whose loss term another output's is (`losses.shared_terms`): {output: that one}.
    shared: dict[str, str] = field(default_factory=dict)
    labels_used: bool = False
    augment: str = "none"  # what augmentation ran, in words
    schedule: str = ""  # optimizer, learning rate, warm-up and decay, in words
    workers: int = 0  # data loading processes (0: the training process)
    resumed_from: int = 0  # epochs done before this run (read from the checkpoint)
    # The written model's validation top-1 / agreement: the best epoch's, but measured again
    # after the re-inserted BatchNorms' statistics are re-measured for folding back.
    val_top1: float = math.nan
    val_agreement: float = math.nan
    logits: str | None = None  # the output cross-entropy and top-1 read (None: none)
    # Initializers folded into a weight when the module was built: written back unchanged.
    untrained: list[str] = field(default_factory=list)

    @property
    def best_val_top1(self) -> float:
        return self.history[self.best_epoch].val_top1 if self.history else math.nan

    @property
    def best_val_agreement(self) -> float:
        return self.history[self.best_epoch].val_agreement if self.history else math.nan


def check_one_input(names: Sequence[str]) -> None:
    """Retraining feeds one input (images, or one model-ready array such as an audio or video
    model's): refuse a model with several (the command line
    asks before it reads the data, whose advice for such a model is another command's)."""
    if len(names) != 1:
        raise BadInputError(f"retraining needs a model with one input, not {list(names)}")


def _check_input(
    model: onnx.ModelProto, module: OnnxModule, samples: Samples, what: str
) -> np.ndarray:
    """Refuse data whose shape cannot feed the model, with a message that says both shapes;
    return its first samples (at least 2), the probe every later check runs."""
    x = samples.take(np.arange(min(2, samples.count)))[0]
    check_one_input(module.input_names)
    graph_input = next(i for i in model.graph.input if i.name == module.input_names[0])
    dims = [
        d.dim_value if d.HasField("dim_value") else None
        for d in graph_input.type.tensor_type.shape.dim
    ]
    if len(dims) != x.ndim or any(
        d is not None and d != s for d, s in zip(dims[1:], x.shape[1:], strict=True)
    ):
        raise BadInputError(
            f"{what} has shape {(samples.count, *x.shape[1:])} but input "
            f"'{graph_input.name}' expects {['?' if d is None else d for d in dims]}"
        )
    return x


def unrunnable_teacher(
    what: str, model: onnx.ModelProto | None = None, missing: Sequence[str] = ()
) -> BadInputError:
    """The refusal of a teacher the bridge cannot run (`what`: a quantised graph, ops the
    bridge lacks). The teacher runs in PyTorch beside the student, so a quantised teacher is
    to be given as the float model it was made from; reduce's advice (reduce the float model,
    then quantize) is not the way here. `model`, the teacher, and its `missing` ops pick the
    advice as the bridge's own refusal does (`way_on`): one onnxruntime's optimisations wrote
    is saved at basic. Without `model`, `what` is a quantised graph."""
    float_model = (
        f"; give {option('--teacher')} the float model it was made from (eval --teacher runs a "
        "quantized one as it is)"
    )
    return BadInputError(
        f"the teacher is {what}, which the PyTorch bridge cannot run (the teacher runs in "
        "PyTorch beside the student)"
        f"{float_model if model is None else way_on(model, missing, float_model)}"
    )


def check_device(device: str) -> None:
    """auto, cpu, cuda or cuda:N, and CUDA only where torch can use it."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise BadInputError(
            f"{option('--device', device)} is not a device: use auto, cpu, cuda or cuda:N"
        )
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and (dev.index or 0) >= count:
        raise BadInputError(
            f"{option('--device', device)}: torch sees {count} CUDA device(s); use "
            f"{option('--device', 'cpu')} (or auto)"
        )


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        # More processes than GPUs (torchrun on one GPU): ranks share GPUs round-robin.
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return dev


def _dist_backend(dev: torch.device) -> str:
    """nccl when every local process has a GPU of its own; gloo on CPU or shared GPUs."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if dev.type == "cuda" and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


AMP_CHOICES = ("off", "bf16")
BN_CALIBRATION_SAMPLES = 1024  # re-inserted BatchNorms are measured on this many samples


def _autocast(dev: torch.device, amp: str):
    """Mixed precision for forward passes: bf16 autocast (no loss scaling needed), or none."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _logits(out: torch.Tensor) -> torch.Tensor:
    """Classifier scores, (batch, classes) or (batch, classes, 1, 1), as (batch, classes)."""
    return out.reshape(out.shape[0], -1)


def _named(module: OnnxModule, out: Any) -> dict[str, torch.Tensor]:
    return dict(zip(module.output_names, out if isinstance(out, tuple) else (out,), strict=True))


def _scores(out: Mapping[str, torch.Tensor], pre: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The outputs in float32, each output in `pre` replaced by the Softmax input it names."""
    return {k: out[pre.get(k, k)].float() for k in out}


def _probe(module: OnnxModule, xb: torch.Tensor, what: str) -> dict[str, tuple[int, ...]]:
    """Output shapes of one eval-mode forward; a graph torch cannot run at this batch is refused
    in one line (e.g. a Reshape whose target fixes batch 1)."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = _named(module, module(xb))
    except RuntimeError as error:
        raise BadInputError(
            f"{what} cannot run a batch of {len(xb)} in PyTorch "
            f"({str(error).strip().splitlines()[0]}); if its graph fixes the batch size "
            "(e.g. a Reshape to batch 1), export it with a dynamic batch"
        ) from None
    finally:
        module.train(was_training)
    return {name: tuple(t.shape) for name, t in out.items()}


def _as_chosen(
    shapes: Mapping[str, tuple[int, ...]], model: onnx.ModelProto, logits: str | None = None
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A fingerprint with its "logits" and "losses" as they act, not as given: a value that
    names the default (the one classifier output; kl for logits, mse otherwise) is left out,
    so that naming the default resumes a run that did not, and the other way round. Applied
    to a checkpoint's fingerprint too: earlier versions recorded them as given."""
    found = classifier_outputs(shapes, model)
    auto = found[0] if len(found) == 1 else None
    default = default_losses(shapes, logits, argmax_inputs(model))

    def chosen(fingerprint: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in fingerprint.items() if k != "logits" or v != auto}
        if isinstance(out.get("losses"), list):
            pairs = (str(spec).rpartition("=") for spec in out["losses"])
            out["losses"] = [f"{n}={k}" for n, _, k in pairs if default.get(n) != k]
        return out

    return chosen


def _reads(
    model: onnx.ModelProto,
    teacher: onnx.ModelProto | None,
    kinds: Mapping[str, str],
    student_pre: Mapping[str, str],
    teacher_pre: Mapping[str, str],
) -> dict[str, tuple[str, str]]:
    """{output: (the student's tensor its loss reads, the teacher's)}, through Identity nodes,
    and for a KL through a class-axis LogSoftmax (softmax ignores its per-row shift: the KL of
    log-probabilities is their logits')."""
    if teacher is None:
        return {}

    def read(graph: onnx.ModelProto, pre: Mapping[str, str], name: str) -> str:
        producers, tensor = producers_of(graph), pre.get(name, name)
        if kinds[name] == "kl":
            tensor = softmax_input(graph, tensor, ("LogSoftmax",), producers) or tensor
        return identity_source(producers, tensor)

    return {n: (read(model, student_pre, n), read(teacher, teacher_pre, n)) for n in kinds}


def _batches(samples: Samples, size: int, limit: int) -> Iterator[torch.Tensor]:
    """The first `limit` samples (no augmentation) as CPU tensors of `size` rows."""
    end = min(samples.count, limit)
    for i in range(0, end, size):
        yield torch.from_numpy(samples.take(np.arange(i, min(i + size, end)))[0])


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _diverged(what: str, epoch: int, step: int, lr: float) -> str:
    return (
        f"training diverged ({what} at epoch {epoch + 1}, step {step + 1}, lr {lr:g}); "
        f"nothing written: lower {option('--lr')}"
    )


def _optimizer(
    module: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    # No weight decay on vectors (biases, BN scale/shift, layer scales): the usual choice
    # for CNNs. A vector is a tensor with at most one axis above 1, whatever its rank.
    params = [p for p in module.parameters() if p.requires_grad]
    vector = [long_axes(p.shape) <= 1 for p in params]
    groups = [
        {"params": [p for p, v in zip(params, vector) if not v], "weight_decay": weight_decay},
        {"params": [p for p, v in zip(params, vector) if v], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise BadInputError(f"optimizer must be 'sgd' or 'adamw', not '{name}'")


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """torch's seed for one epoch of one process (dropout): resumed epochs draw the same."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _data_digest(samples: Samples) -> str:
    """What fixes the samples a run trains on: arrays' bytes; for a data source, what it read
    (its pixels in memory, or an image folder's files by absolute path), its labels and its
    preprocessing (the numbers, not where they came from). Not its description, which names
    the file or folder as it was given (a renamed npz holds the same samples)."""
    source = samples.source
    if source is None:
        parts = [samples.x, samples.y]
    else:
        preprocess = samples.preprocess and replace(samples.preprocess, origin="")
        parts = [
            repr(preprocess),
            getattr(source, "raw", None),
            getattr(source, "labels", None),
            *getattr(source, "extra", {}).values(),
            "\n".join(map(os.path.abspath, getattr(source, "files", ()))),
        ]
    digest = hashlib.sha256()
    for part in parts:
        if part is not None:
            digest.update(part.tobytes() if isinstance(part, np.ndarray) else part.encode())
    return digest.hexdigest()


def _duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def epoch_line(e: EpochStats, epochs: int, eta: float, labels: bool = True) -> str:
    """One epoch as a log line: loss, accuracy (without `labels`, agreement with the teacher's
    top-1), validation, images/s, time, ETA."""
    parts = [f"epoch {e.epoch + 1}/{epochs}: loss {e.train_loss:.4f}"]
    if not math.isnan(e.train_acc):
        what = "train acc" if labels else "train agreement with the teacher"
        parts.append(f"{what} {e.train_acc:.2%}")
    if not math.isnan(e.val_top1):
        parts.append(f"val top-1 {e.val_top1:.2%}")
    if not math.isnan(e.val_agreement):
        parts.append(f"val agreement with the teacher {e.val_agreement:.2%}")
    parts += [f"{e.images_per_second:.0f} images/s", f"{e.seconds:.1f} s"]
    parts.append(f"ETA {_duration(eta)}" if e.epoch + 1 < epochs else "done")
    return ", ".join(parts)


def retrain(
    model: onnx.ModelProto,
    train_data: Any,
    val_data: Any = None,
    *,
    teacher: onnx.ModelProto | None = None,
    epochs: int = 1,
    lr: float | None = None,
    batch_size: int = 64,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    seed: int = 0,
    distill_alpha: float = 0.5,
    temperature: float = 4.0,
    device: str = "auto",
    amp: str = "off",
    progress: bool = True,
    reinsert_bn: bool | None = None,
    losses: Mapping[str, str] | None = None,
    features: Sequence[str] = (),
    feature_weight: float = 1.0,
    bn_calibration_samples: int = BN_CALIBRATION_SAMPLES,
    augment: str = "auto",
    label_smoothing: float = 0.0,
    warmup: float = DEFAULT_WARMUP,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    workers: int | None = None,
    logits: str | None = None,
    freeze: Sequence[str] = (),
) -> RetrainResult:
    """Retrain `model` on `train_data`; return the written-back model of the best epoch.

    `train_data`/`val_data`: (x, y) arrays (x: float model inputs, preprocessed; for an
    integer input, such as uint8 pixels the graph casts itself, arrays of its own type, fed as
    they are, as onnxruntime is fed) or
    DataSources (image folders stay on disk and are decoded by `workers` processes; None:
    the cores where there is decoding or augmentation to do, else 0). y may be None
    (unlabelled) when a teacher is given.
    The best epoch is the one with the highest validation top-1; with unlabelled validation
    data, the highest agreement with the teacher's top-1; the last one without val data.
    `lr` None: `default_lr(batch_size)`. The schedule warms up linearly over `warmup` (a
    fraction of all steps), then decays by cosine to 0. `label_smoothing` applies to the
    cross-entropy terms. `augment`: "auto" (standard for image data read by `open_data`, none
    for arrays given as model inputs), "none" or "standard" (`onnx_mbs.data.augment`).
    `checkpoint`: a directory written after every epoch; `resume` continues from it.
    `amp="bf16"` runs forward passes under bf16 autocast; weights and updates stay float32.
    `reinsert_bn`: None (default) re-inserts BatchNorm when the graph is BN-folded (`is_bn_folded`).
    With a teacher (the unreduced graph) the re-inserted BNs take their affine from the teacher's
    conv-output statistics (channels matched by name and bias, `bn.channel_maps`).
    `losses`: {output name: "kl" | "mse" | "none"} overriding the per-output default.
    `features`: intermediate tensor names both graphs have, distilled with normalised MSE.
    `logits`: the output cross-entropy and top-1 read, where several are classifier-shaped
    (`onnx_mbs.logits`); an output a Softmax makes is trained on the Softmax's input;
    "none": no output is logits (no cross-entropy or top-1; every output distils with mse).
    `freeze`: initializer names kept as they are (not trained, no weight decay; `freeze.py`).
    """
    start = time.perf_counter()
    lr = default_lr(batch_size) if lr is None else lr
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise BadInputError(
            f"epochs and batch_size must be at least 1 and lr a positive number (lr {lr})"
        )
    if not 0.0 <= label_smoothing < 1.0 or not 0.0 <= warmup < 1.0:
        raise BadInputError(
            f"label smoothing and warm-up must be in [0, 1) "
            f"(label smoothing {label_smoothing}, warm-up {warmup})"
        )
    if workers is not None and workers < 0:
        raise BadInputError(f"workers must be 0 or more, not {workers}")
    check_device(device)
    if isinstance(checkpoint, str) and not checkpoint.strip():  # "$DIR" with DIR unset
        raise BadInputError(
            f"{option('--checkpoint')} is empty: give a directory, or leave it out to write "
            "no checkpoints"
        )
    if resume and checkpoint is None:
        raise BadInputError(
            f"{option('--resume')} continues from a {option('--checkpoint')} DIR: give one"
        )
    fed = _fed_type(model)
    train = as_samples(train_data, "training data", fed)
    val = as_samples(val_data, "validation data", fed) if val_data is not None else None
    if val is not None and train.labelled and val.labelled:
        check_same_classes(train_data, val_data, val.labels())
    if amp not in AMP_CHOICES:
        raise BadInputError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if not train.labelled and teacher is None:
        raise BadInputError(
            f"training data has no labels: give labels or a {option('--teacher')} to distil"
        )
    if features and teacher is None:
        raise BadInputError(f"feature distillation needs a {option('--teacher')}")
    if teacher is not None:
        _check_features_computed(model, teacher, features)
        check_teacher_input(fed, _fed_type(teacher))  # float16 beside float32: fed float32
    frozen = check_frozen(freeze, model, teacher)
    if val is not None and not val.labelled and teacher is None:
        raise BadInputError(
            f"validation data has no labels: give labels, or a {option('--teacher')} to pick "
            "the best epoch by agreement with it"
        )

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if batch_size % world:  # else the global batch is not the one the lr was scaled for
        raise BadInputError(
            f"{option('--batch-size', batch_size)} is the global batch, split evenly over the "
            f"{world} processes: give a multiple of {world}"
        )
    if train.count // world < 2:  # before any probe: they take 2 samples
        raise BadInputError(
            f"need at least 2 training samples per process, got {train.count // world}"
        )
    given_model, given_teacher = model, teacher
    dev = _pick_device(device, local_rank)
    owns_group = False
    made: list[Path] = []  # checkpoint folders this run made: removed if it stops before one
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(_dist_backend(dev))
        owns_group = True
    try:
        torch.manual_seed(seed + rank)
        sources: dict[str, str] = {}  # untied copy -> the initializer it copies
        original = untie_initializers(model, sources)  # written back into, in its own dtypes
        held = [*frozen, *(copy for copy, source in sources.items() if source in frozen)]
        model = as_float32(original) if is_low_precision(original) else original
        base = OnnxModule(model).to(dev)
        if not any(True for _ in base.parameters()):
            raise BadInputError(
                "the model has no trainable weights (float initializers of Conv, Gemm, MatMul, "
                "BatchNormalization ...): there is nothing to retrain"
            )
        local_batch = batch_size // world
        _check_input(model, base, train, "training data")
        probe_np = train.take(np.arange(max(2, min(local_batch, train.count))))[0]
        probe_x = torch.from_numpy(probe_np).to(dev)
        early = _probe(base, probe_x, "the model")
        del base
        if reinsert_bn is None:
            reinsert_bn = is_bn_folded(model)
        recipe = choose_augment(augment, tuple(probe_np.shape), train.preprocess)
        if workers is None:
            workers = default_workers() if train.decoded or recipe is not None else 0
        val_workers = workers if val is not None and val.decoded else 0
        fingerprint = {
            "model": ckpt.model_digest(given_model),
            "teacher": ckpt.model_digest(given_teacher),
            "training data": _data_digest(train),
            "validation data": _data_digest(val) if val is not None else "none",
            "labels": train.labelled,
            "epochs": epochs,
            "lr": lr,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "seed": seed,
            "distill_alpha": distill_alpha,
            "temperature": temperature,
            "amp": amp,
            "reinsert_bn": bool(reinsert_bn),
            # Trained since Slice/Split/Gather/Expand are followed: earlier checkpoints lack them.
            **({"indexed weights": indexed} if (indexed := indexed_weights(model)) else {}),
            "losses": [f"{k}={v}" for k, v in sorted(dict(losses or {}).items())],
            "features": list(features),
            "feature_weight": feature_weight,
            "augment": recipe.describe() if recipe is not None else "none",
            "label_smoothing": label_smoothing,
            "warmup": warmup,
            "world_size": world,
            **({"logits": logits} if logits is not None else {}),
            **({"freeze": sorted(frozen)} if frozen else {}),
            # Only where it counts and is not the default: earlier checkpoints lack the key.
            **(
                {"bn_calibration_samples": bn_calibration_samples}
                if reinsert_bn and bn_calibration_samples != BN_CALIBRATION_SAMPLES
                else {}
            ),
        }
        saved = None
        if checkpoint is not None:
            chosen = _as_chosen({o.name: early[o.name] for o in model.graph.output}, model, logits)
            fingerprint = chosen(fingerprint)
            saved = ckpt.load(checkpoint, fingerprint, chosen)
        if saved is not None and not resume:
            raise BadInputError(
                f"{ckpt.path_in(checkpoint)} holds a checkpoint after epoch {saved['epoch']} of "
                f"{epochs}: add {option('--resume', True)} to continue from it, or give another "
                f"{option('--checkpoint')} DIR"
            )
        train_model, inserted = model, []
        teacher_module, kinds, teacher_pre, teacher_maps = None, {}, {}, {}
        if teacher is not None:
            if is_low_precision(teacher):
                teacher = as_float32(teacher)
            # Checked before the teacher's statistics are measured for the re-inserted BNs.
            if missing := unsupported_ops(teacher):
                raise unrunnable_teacher(f"a graph with {', '.join(missing)}", teacher, missing)
            teacher_pre = softmax_inputs(teacher)
            teacher_maps = {n: t for n, (t, _) in argmax_inputs(teacher).items()}
            extra = [*features, *teacher_pre.values(), *teacher_maps.values()]
            teacher_module = OnnxModule(with_outputs(teacher, extra))
            teacher_module = teacher_module.to(dev).eval().requires_grad_(False)
            _check_input(teacher, teacher_module, train, "training data (teacher)")
            teacher_shapes = _probe(teacher_module, probe_x, "the teacher")
        if reinsert_bn:
            # The teacher (the unreduced graph) gives each BN its target statistics.
            calib = _batches(train, len(probe_x), bn_calibration_samples)
            train_model, inserted = reinsert_batchnorm(model, calib, teacher)
            check_not_folded(held, inserted)
        student_pre, argmaxes = softmax_inputs(model), argmax_inputs(model)
        student_maps = {n: t for n, (t, _) in argmaxes.items()}
        extra = [*features, *student_pre.values(), *student_maps.values()]
        student = OnnxModule(with_outputs(train_model, extra))
        if val is not None:
            _check_input(model, student, val, "validation data")
        student.to(dev).train()
        kept = freeze_named(student, held)
        shapes = _probe(student, probe_x, "the model")
        outputs = {o.name: shapes[o.name] for o in model.graph.output}
        axes = {n: axis % len(shapes[t]) for n, (t, axis) in argmaxes.items()}  # class axes
        # Several classifier-shaped outputs: labels (or top-1 on --val) need the user to say
        # which; a teacher alone distils every output, with no pseudo-labels.
        several = len(classifier_outputs(outputs, model)) > 1
        logits_name = choose_logits(
            outputs, model, logits, required=several and (train.labelled or val is not None)
        )
        if teacher is not None:
            _check_teacher(outputs, teacher_shapes, features, shapes)
            # A label map an ArgMax makes is trained on the scores it reads (`argmax_inputs`).
            scored = {
                n: shapes[student_maps[n]] if n in student_maps else s for n, s in outputs.items()
            }
            kinds = choose_losses(scored, losses, logits, student_maps)
            _check_trainable(model, kinds, student_maps, teacher_maps)
        elif losses:
            raise BadInputError(
                f"{option('--loss')} chooses distillation losses: it needs a {option('--teacher')}"
            )
        labels_used = train.labelled and logits_name is not None
        said = f" ({option('--logits', NONE)})" if is_none(logits) else ""
        if train.labelled and not labels_used and teacher is None:
            raise BadInputError(
                f"the data has labels but the model has no classifier output{said} (batch, "
                f"classes) among {list(outputs)}: retrain it with {option('--teacher')}"
            )
        if val is not None and logits_name is None:
            # A teacher gives no way round it: agreement with it is a top-1 too (its argmax).
            none = f" --logits {NONE}" if is_none(logits) else ""
            raise BadInputError(
                f"{option('--val')} picks the best epoch by top-1 (against its labels, or the "
                f"teacher's argmax without them), which needs a classifier output (batch, "
                f"classes){said}: leave {option('--val')} out to keep the last epoch, and "
                f"compare the result with the original: `onnx-mbs eval OUTPUT --teacher "
                f"ORIGINAL --data VAL{none}` (Python: onnx_mbs.evaluate.agreement) gives each "
                "output's relative error and cosine"
            )
        if logits_name is not None:
            classes = classes_of(outputs[logits_name])
            for data, what in ((train, "the training data"), (val, "the validation data")):
                if data is not None and data.labelled:
                    check_label_range(data.labels(), classes, logits_name, what)
        # Cross-entropy and KL read a Softmax output's input: on probabilities they are on
        # the wrong scale (`onnx_mbs.logits`). An mse output is compared as it is.
        ce_tensor = student_pre.get(logits_name, logits_name)
        student_pre = {n: t for n, t in student_pre.items() if kinds.get(n) == "kl"}
        teacher_pre = {n: t for n, t in teacher_pre.items() if kinds.get(n) == "kl"}
        scores = {n: t for n, t in student_maps.items() if kinds.get(n, "none") != "none"}
        student_pre |= scores
        teacher_pre |= {n: teacher_maps[n] for n in scores}
        shared = shared_terms(kinds, _reads(model, teacher, kinds, student_pre, teacher_pre), axes)
        counted = {n: k for n, k in kinds.items() if n not in shared}  # each term once
        net: torch.nn.Module = student
        if world > 1:
            read = [student_pre.get(n, n) for n, k in kinds.items() if k != "none"]
            read += [*features, *([ce_tensor] if logits_name is not None else [])]
            _freeze_unread(student, probe_x, read)
            net = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[dev.index] if dev.type == "cuda" else None
            )

        per_rank = train.count // world
        steps = math.ceil(per_rank / local_batch)
        if per_rank % local_batch == 1:
            steps -= 1  # a batch of one breaks BatchNorm in train mode: drop it
        opt = _optimizer(student, optimizer, lr, weight_decay, momentum)
        total_steps = epochs * steps
        warmup_steps = round(warmup * total_steps)
        if warmup_steps > max(0, total_steps - 2):  # the cosine's first step is at the peak
            raise BadInputError(
                f"{option('--warmup')} {warmup:g} warms up over {warmup_steps} of this run's "
                f"{total_steps} steps: the learning rate would never fall below its peak (the "
                "cosine decay needs 2 steps after the warm-up); lower it or train for more steps"
            )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total_steps, warmup_steps)
        )
        alpha = distill_alpha if labels_used else 1.0
        show = progress and rank == 0 and sys.stderr.isatty()
        say = progress and rank == 0
        schedule = (
            f"{optimizer} lr {lr:g}, warm-up {warmup_steps} of {total_steps} steps then cosine "
            f"to 0, batch {batch_size}"
            + (f", label smoothing {label_smoothing:g}" if label_smoothing else "")
        )
        augment_text = recipe.describe() if recipe is not None else "none"

        history: list[EpochStats] = []
        best_epoch, best_top1, best_state = 0, -math.inf, None
        first_epoch = 0
        if saved is not None:
            student.load_state_dict(saved["student"])
            try:
                opt.load_state_dict(saved["optimizer"])
            except ValueError:  # its parameter groups are not this run's
                raise BadInputError(
                    "the checkpoint's optimizer state does not fit this run's parameter groups "
                    "(written by another onnx-mbs version?); give another "
                    f"{option('--checkpoint')} DIR to start over"
                ) from None
            sched.load_state_dict(saved["schedule"])
            history = [EpochStats(**h) for h in saved["history"]]
            best_epoch, best_top1, best_state = (
                saved["best_epoch"],
                saved["best_score"],
                saved["best_state"],
            )
            first_epoch = saved["epoch"]
            ckpt.set_random_states(saved["random"])
        if world > 1 and checkpoint is not None:
            _check_same_start(first_epoch, checkpoint, dev)
        if rank == 0 and student.untrained:
            print(untrained_line(student.untrained), file=sys.stderr, flush=True)
        if say:
            print(f"augmentation: {augment_text}", file=sys.stderr)
            print(f"schedule: {schedule}; data workers: {workers}", file=sys.stderr)
            if saved is not None and first_epoch >= epochs:
                print(
                    f"{ckpt.path_in(checkpoint)} holds all {epochs} epoch(s) of this run: "
                    "nothing left to train; writing its model",
                    file=sys.stderr,
                )
            elif saved is not None:
                print(
                    f"resuming from {ckpt.path_in(checkpoint)} after epoch {first_epoch}",
                    file=sys.stderr,
                )
            elif checkpoint is not None and resume:
                print(f"no checkpoint in {checkpoint} yet: starting at epoch 1", file=sys.stderr)
            sys.stderr.flush()
        if checkpoint is not None and rank == 0:
            made = ckpt.prepare(checkpoint)  # every check passed: not left by a refusal
        train_seconds, images = 0.0, 0

        def measure() -> tuple[float, float]:
            """(top-1, agreement with the teacher) of `student` on `val`, the other NaN."""
            if val is None:
                return math.nan, math.nan
            hits, total = _validate(
                student,
                teacher_module if not val.labelled else None,
                val,
                (rank, world, max(local_batch, 64)),
                dev,
                logits_name,
                val_workers,
            )
            hits, total = _all_sum([float(hits), float(total)], dev, world)
            return (hits / total, math.nan) if val.labelled else (math.nan, hits / total)

        for epoch in range(first_epoch, epochs):
            t0 = time.perf_counter()
            torch.manual_seed(_epoch_seed(seed, epoch, rank))
            keys = rank_batches(train.count, seed, epoch, rank, world, local_batch, steps)
            student.train()
            sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss*n, correct, n
            bar = progress_bar(steps, f"epoch {epoch + 1}/{epochs}", show, unit="step")
            lr_now = opt.param_groups[0]["lr"]
            batches = load_batches(train, keys, recipe, seed, workers)
            for step, (xb, yb) in enumerate(batches):
                xb = xb.to(dev, non_blocking=True)
                with _autocast(dev, amp):
                    raw = {k: v.float() for k, v in _named(student, net(xb)).items()}
                out = _scores(raw, student_pre)
                loss = out[student.output_names[0]].new_zeros(())
                soft = None
                if teacher_module is not None:
                    with torch.no_grad(), _autocast(dev, amp):
                        out_t = _named(teacher_module, teacher_module(xb))
                        soft = _scores(out_t, teacher_pre)
                    loss = alpha * distillation_loss(out, soft, counted, temperature, axes)
                    for name in features:
                        loss = loss + alpha * feature_weight * normalised_mse(out[name], soft[name])
                if labels_used:
                    yb = yb.to(dev, non_blocking=True)
                    ce = F.cross_entropy(
                        _logits(raw[ce_tensor]), yb, label_smoothing=label_smoothing
                    )
                    loss = loss + (1 - alpha) * ce if soft is not None else ce
                elif soft is not None and logits_name is not None:
                    # No labels: the teacher's argmax stands in for them (hard pseudo-labels),
                    # weighted as labels would be.
                    yb = _logits(soft[logits_name]).argmax(1)
                    ce = F.cross_entropy(
                        _logits(raw[ce_tensor]), yb, label_smoothing=label_smoothing
                    )
                    loss = distill_alpha * loss + (1 - distill_alpha) * ce
                else:
                    yb = None
                if step == 0:  # the graph decides, the same at every step
                    _check_gradient(loss, out, kinds)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if not torch.isfinite(loss):
                    bad = (~torch.isfinite(xb.flatten(1)).all(1)).nonzero().flatten().tolist()
                    if bad:  # no learning rate helps: name the sample
                        raise BadInputError(
                            f"the training data holds non-finite values (NaN or inf): sample "
                            f"{int(keys[step][1][bad[0]])} (of {len(bad)} in the batch of "
                            f"epoch {epoch + 1}, step {step + 1}); nothing written"
                        )
                    raise BadInputError(_diverged(f"loss {loss.item()}", epoch, step, lr_now))
                opt.step()
                sched.step()
                with torch.no_grad():
                    n = len(xb)
                    hits = (
                        (_logits(raw[logits_name]).argmax(1) == yb).sum().double()
                        if yb is not None
                        else loss.new_tensor(math.nan, dtype=torch.float64)
                    )
                    sums += torch.stack(
                        [
                            loss.detach().double() * n,
                            hits,
                            torch.tensor(float(n), dtype=torch.float64, device=dev),
                        ]
                    )
                if show:
                    bar.update()
                    if step % 10 == 0 or step == steps - 1:
                        s = sums.tolist()
                        bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{s[1] / s[2]:.3f}")
            bar.close()
            seconds = time.perf_counter() - t0
            train_seconds += seconds
            loss_sum, correct, count = _all_sum(sums.tolist(), dev, world)
            images += int(count)

            # Frozen BatchNorm statistics the train-mode forwards moved are put back before
            # validation, which measures (and picks the best epoch by) the model as written.
            restore(student, kept)
            val_top1, val_agreement = measure()
            history.append(
                EpochStats(
                    epoch=epoch,
                    train_loss=loss_sum / count,
                    train_acc=correct / count,
                    val_top1=val_top1,
                    lr=lr_now,
                    seconds=time.perf_counter() - t0,
                    images_per_second=count / seconds if seconds > 0 else 0.0,
                    val_agreement=val_agreement,
                )
            )
            score = (
                (val_top1 if val.labelled else val_agreement) if val is not None else float(epoch)
            )
            if score > best_top1:
                best_epoch, best_top1 = epoch, score
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
            if say:
                done = history[first_epoch:]
                eta = sum(h.seconds for h in done) / len(done) * (epochs - epoch - 1)
                line = epoch_line(history[-1], epochs, eta, labels_used)
                print(line, file=sys.stderr, flush=True)
            if checkpoint is not None and rank == 0:
                ckpt.save(
                    checkpoint,
                    {
                        "fingerprint": fingerprint,
                        "epoch": epoch + 1,
                        "student": student.state_dict(),
                        "optimizer": opt.state_dict(),
                        "schedule": sched.state_dict(),
                        "history": [asdict(h) for h in history],
                        "best_epoch": best_epoch,
                        "best_score": best_top1,
                        "best_state": best_state,
                        "random": ckpt.random_states(),
                        # Epoch e's order is epoch_order(count, seed, e): seed and e fix it.
                        "data_order": {"seed": seed, "samples": train.count, "next": epoch + 1},
                    },
                )
        if best_state is not None and best_epoch != epochs - 1:
            student.load_state_dict(best_state)
        written_val = (
            (history[best_epoch].val_top1, history[best_epoch].val_agreement)
            if history
            else (math.nan, math.nan)
        )
        if inserted:
            calib = Rereads(
                lambda: (b.to(dev) for b in _batches(train, len(probe_x), bn_calibration_samples))
            )
            _recalibrate_inserted(student, inserted, calib)
            written_val = measure()  # the recalibrated statistics are the written model's
        student.eval()
        restore(student, kept)
        if not all(bool(torch.isfinite(p).all()) for p in student.state_dict().values()):
            raise BadInputError(_diverged("non-finite weights", epochs - 1, steps - 1, lr))
        result_model = fold_back(original, write_back(train_model, student), inserted)
        # Release DDP's reducer and let every rank finish before the group goes:
        # gloo threads still holding work at interpreter exit abort the process.
        del net
        if owns_group:
            dist.barrier()
    except BaseException:  # Ctrl-C, SIGTERM, a refusal or a fault: no empty folder left
        ckpt.remove_made(made)
        raise
    finally:
        if owns_group:
            dist.destroy_process_group()
    return RetrainResult(
        model=result_model,
        history=history,
        best_epoch=best_epoch,
        seconds=time.perf_counter() - start,
        images_per_second=images / train_seconds if train_seconds > 0 else 0.0,
        device=str(dev),
        world_size=world,
        bn_reinserted=len(inserted),
        losses=kinds,
        shared=shared,
        scores=scores,
        labels_used=labels_used,
        augment=augment_text,
        schedule=schedule,
        workers=workers,
        resumed_from=first_epoch,
        val_top1=written_val[0],
        val_agreement=written_val[1],
        logits=logits_name,
        untrained=sorted(student.untrained),
    )


def _check_same_start(first_epoch: int, checkpoint: Any, dev: torch.device) -> None:
    """Every process resumes after the same epoch: where each node reads DIR on a disk of its
    own, they would wait on each other's collectives for ever."""
    both = torch.tensor([first_epoch, -first_epoch], dtype=torch.int64, device=dev)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    latest, earliest = int(both[0]), -int(both[1])
    if latest != earliest:
        raise BadInputError(
            f"not every process sees the same checkpoint in {checkpoint}: some would resume "
            f"after epoch {earliest}, some after epoch {latest}; give a {option('--checkpoint')} "
            "DIR that every process reads (a shared folder)"
        )


def _freeze_unread(student: OnnxModule, probe_x: torch.Tensor, read: Sequence[str]) -> None:
    """Mark the weights no loss term can reach (a head nothing distils, a weight only a Shape
    reads) as not trainable. They get no gradient either way, but DistributedDataParallel
    refuses a weight without one at the second step; one process leaves them as they are too."""
    student.eval()
    params = [p for p in student.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = _named(student, student(probe_x))
        total = sum(out[name].float().sum() for name in dict.fromkeys(read))
    grads = torch.autograd.grad(total, params, allow_unused=True)
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            param.requires_grad_(False)
    student.train()


@torch.no_grad()
def _validate(
    student: OnnxModule,
    teacher: OnnxModule | None,
    val: Samples,
    shard: tuple[int, int, int],
    dev: torch.device,
    logits_name: str,
    workers: int,
) -> tuple[int, int]:
    """(hits, count) on this rank's share of `val`: top-1 against the labels, or, given a
    teacher, agreement with the teacher's top-1. Non-finite rows never count."""
    rank, world, size = shard
    mine = np.arange(rank, val.count, world)
    keys = [(0, mine[i : i + size]) for i in range(0, len(mine), size)]
    student.eval()
    hits = 0
    for xb, yb in load_batches(val, keys, None, 0, workers):
        xb = xb.to(dev)
        logits = _logits(_named(student, student(xb))[logits_name])
        pred = torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1)
        if teacher is not None:
            target = _logits(_named(teacher, teacher(xb))[logits_name]).argmax(1)
        else:
            target = yb.to(dev)
        hits += int((pred == target).sum())
    student.train()
    return hits, len(mine)


def _check_features_computed(
    model: onnx.ModelProto, teacher: onnx.ModelProto, features: Sequence[str]
) -> None:
    """Each feature must be a tensor both graphs compute (read out by name, before any run)."""
    for name in features:
        missing = [
            who
            for who, graph in (("the model", model.graph), ("the teacher", teacher.graph))
            if name not in {o for node in graph.node for o in node.output}
        ]
        if missing:
            raise BadInputError(
                f"feature tensor '{name}' is not computed by {' or '.join(missing)}: "
                f"{option('--feature')} "
                "names an intermediate tensor (a node output) both graphs compute"
            )


def _check_trainable(
    model: onnx.ModelProto,
    kinds: Mapping[str, str],
    maps: Mapping[str, str],
    teacher_maps: Mapping[str, str],
) -> None:
    """Every output a loss reads must carry a gradient: a label map an ArgMax makes is read
    through its scores, which the teacher must have too; the other integer or boolean outputs
    (indices, counts, a mask) are refused in one line naming them all and the `--loss
    OUTPUT=none` options that leave them out."""
    held: dict[str, str] = {}
    types = non_float(model)  # {output: integer or boolean type}
    for out in model.graph.output:
        if kinds.get(out.name, "none") == "none":
            continue
        if out.name in maps:
            if out.name not in teacher_maps:
                raise BadInputError(
                    f"output '{out.name}' is an ArgMax's label map, trained on the scores it "
                    "reads, but the teacher's output of that name is not made by an ArgMax: "
                    f"distil from the original, or leave it out with {left_out([out.name])}"
                )
            continue
        if out.name in types:
            held[out.name] = types[out.name]
    if len(held) == 1:
        ((name, kind),) = held.items()
        raise BadInputError(
            f"output '{name}' holds {kind} values, which carry no gradient: no loss can train "
            f"it; leave it out with {left_out([name])}"
        )
    if held:
        named = [f"'{n}' ({t})" for n, t in held.items()]
        raise BadInputError(
            f"outputs {', '.join(named[:-1])} and {named[-1]} hold values that carry no "
            f"gradient: no loss can train them; leave them out with {left_out(list(held))}"
        )


def _check_gradient(
    loss: torch.Tensor, out: Mapping[str, torch.Tensor], kinds: Mapping[str, str]
) -> None:
    """Refuse a loss no output gives a gradient: float outputs computed from integers or
    booleans (a Cast of a comparison: a mask as float), which only the forward shows, where
    backward would crash ('element 0 of tensors does not require grad'). Beside an output
    that carries one, such an output's term is a constant: left, as an output computed from
    no weight (anchors from the input size) is."""
    if loss.requires_grad:
        return
    names = [n for n, k in kinds.items() if k != "none" and not out[n].requires_grad]
    named = ", ".join(map(repr, names)) or "of the logits"
    raise BadInputError(
        f"no loss can train the model: no gradient comes through output(s) {named} (computed "
        "from integers or booleans, or from no trained weight)"
    )


def _check_teacher(
    outputs: Mapping[str, tuple[int, ...]],
    teacher: Mapping[str, tuple[int, ...]],
    features: Sequence[str],
    student_all: Mapping[str, tuple[int, ...]],
) -> None:
    """The teacher must produce every output (and feature) of the model, with the same shape."""
    for name, shape in outputs.items():
        if name not in teacher:
            raise BadInputError(
                f"the teacher has no output '{name}' (its outputs: {list(teacher)}): "
                "distillation compares outputs of the same name"
            )
        if teacher[name] != shape:
            raise BadInputError(
                f"output '{name}' has shape {list(shape)} in the model but "
                f"{list(teacher[name])} in the teacher: they must match to distil"
            )
    for name in features:
        if name not in student_all or name not in teacher:
            raise BadInputError(f"feature tensor '{name}' is not in both graphs")
        if student_all[name] != teacher[name]:
            raise BadInputError(
                f"feature tensor '{name}' has shape {list(student_all[name])} in the model but "
                f"{list(teacher[name])} in the teacher (channels were removed there): "
                "distil a tensor whose channels were kept"
            )


def _recalibrate_inserted(module: OnnxModule, inserted: list, batches: Rereads) -> None:
    """Re-measure the re-inserted BNs' running statistics, which lag the trained weights
    (momentum 0.1 over a few steps), so the folded weights compute what training settled on.
    The graph's own BNs keep theirs (and normalise with them while the others are measured)."""
    recalibrate(module, batches, {bn.mean for bn in inserted})


def check_recalibration(model: onnx.ModelProto, batch_size: int = 64) -> None:
    """Refuse what `recalibrate_model` could not do: a BN-folded graph, batches of no
    sample. `reduce --recalibrate` asks before it reduces."""
    if not has_batchnorm(model):
        # retrain re-inserts one only after a biased Conv: not where a BatchNorm is written as
        # a Mul and an Add after a Conv without bias (as tf2onnx writes one it does not fold)
        where, there = (
            ("folded into its Convs", " (BatchNorm is re-inserted there)")
            if foldable_convs(model)
            else ("nor a biased Conv to re-insert one after", "")
        )
        raise BadInputError(
            f"the model has no BatchNormalization ({where}): recalibration has nothing to "
            f"re-estimate; retrain it instead{there}"
        )
    if batch_size < 1:
        raise BadInputError(
            "BN recalibration needs a batch size of at least 1, not "
            f"{option('--batch-size', batch_size)}"
        )


def _fed_type(model: onnx.ModelProto) -> np.dtype | None:
    """The type the model's input is fed in where it is an integer or bool (uint8 pixels its
    graph converts itself: model-ready data, fed as it is); None for a float input of any
    width (fed float32: the bridge computes fp16/bf16 graphs in float32)."""
    inputs = declared_inputs(model)
    return fed_type(inputs[0].dtype if inputs else None)  # no input or type: left to checks


def recalibrate_model(
    model: onnx.ModelProto, data: Any, batch_size: int = 64, device: str = "cpu"
) -> tuple[onnx.ModelProto, int]:
    """`model` with every BatchNorm's running statistics re-estimated on `data` (no training),
    and the number of batches used. A BN-folded graph has nothing to re-estimate: refused
    (`check_recalibration`). Batches of one sample are measured as any other (eval mode)."""
    check_recalibration(model, batch_size)
    check_device(device)
    original = untie_initializers(model)
    model = as_float32(original) if is_low_precision(original) else original
    samples = as_samples(data, "calibration data", _fed_type(model))
    if samples.count < 2:
        raise BadInputError("BN recalibration needs at least 2 samples")
    module = OnnxModule(model)
    _check_input(model, module, samples, "calibration data")
    dev = _pick_device(device, 0)
    module.to(dev).eval()
    batches = Rereads(lambda: (b.to(dev) for b in _batches(samples, batch_size, samples.count)))
    count = recalibrate(module, batches)
    return write_back(original, module.eval()), count

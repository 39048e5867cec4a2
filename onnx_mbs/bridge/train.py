"""Retrain an ONNX classifier through the PyTorch bridge, optionally distilling from a teacher.

`retrain` builds an `OnnxModule`, trains it with SGD or AdamW under a cosine learning-rate
schedule, validates top-1 after every epoch and returns the ONNX model of the best epoch with
the trained weights written back into the unchanged graph. (One exception: initializers the torch
exporter tied through `Identity(initializer)` nodes are untied first -- see `untie_initializers` --
so those Identity nodes are replaced by initializers of their own.)

Loss: cross-entropy with the labels on the classifier logits (the first (batch, classes) output);
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

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.nn.functional as F

from onnx_mbs.bridge.bn import fold_back, has_batchnorm, is_bn_folded, recalibrate
from onnx_mbs.bridge.bn import reinsert_bn as reinsert_batchnorm
from onnx_mbs.bridge.losses import choose_losses, distillation_loss, is_logits, normalised_mse
from onnx_mbs.bridge.module import OnnxModule, untie_initializers, with_outputs
from onnx_mbs.bridge.precision import as_float32, is_low_precision
from onnx_mbs.bridge.writeback import write_back
from onnx_mbs.data import to_arrays
from onnx_mbs.passes.errors import BadInputError
from onnx_mbs.progress import progress_bar


@dataclass
class EpochStats:
    """One epoch: mean training loss and accuracy, validation top-1 (NaN without val data)."""

    epoch: int
    train_loss: float
    train_acc: float
    val_top1: float
    lr: float
    seconds: float


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
    labels_used: bool = False

    @property
    def best_val_top1(self) -> float:
        return self.history[self.best_epoch].val_top1 if self.history else math.nan


def as_arrays(data: Any, what: str = "data") -> tuple[np.ndarray, np.ndarray | None]:
    """(x float32 NCHW, y int64 or None) from an (x, y) tuple or a DataSource-like object."""
    if isinstance(data, tuple) and len(data) == 2:
        x, y = data
    elif hasattr(data, "batches"):
        x, y = to_arrays(data)
    else:
        raise BadInputError(f"{what} must be an (x, y) pair of arrays or a DataSource")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if y is not None:
        y = np.asarray(y).astype(np.int64, copy=False).reshape(-1)
        if len(y) != len(x):
            raise BadInputError(f"{what} has {len(x)} inputs but {len(y)} labels")
    return x, y


def _check_input(model: onnx.ModelProto, module: OnnxModule, x: np.ndarray, what: str) -> None:
    """Refuse data whose shape cannot feed the model, with a message that says both shapes."""
    if len(module.input_names) != 1:
        raise BadInputError(f"retraining needs a model with one input, not {module.input_names}")
    graph_input = next(i for i in model.graph.input if i.name == module.input_names[0])
    dims = [
        d.dim_value if d.HasField("dim_value") else None
        for d in graph_input.type.tensor_type.shape.dim
    ]
    if len(dims) != x.ndim or any(
        d is not None and d != s for d, s in zip(dims[1:], x.shape[1:], strict=True)
    ):
        raise BadInputError(
            f"{what} has shape {tuple(x.shape)} but input '{graph_input.name}' expects "
            f"{['?' if d is None else d for d in dims]}"
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


def _autocast(dev: torch.device, amp: str):
    """Mixed precision for forward passes: bf16 autocast (no loss scaling needed), or none."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp == "bf16")


def _logits(out: Any, index: int = 0) -> torch.Tensor:
    out = out[index] if isinstance(out, tuple) else out
    return out.reshape(out.shape[0], -1)


def _named(module: OnnxModule, out: Any) -> dict[str, torch.Tensor]:
    return dict(zip(module.output_names, out if isinstance(out, tuple) else (out,), strict=True))


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


def _batches(x: np.ndarray, size: int, limit: int):
    """The first `limit` rows of `x` as CPU tensors of `size` rows."""
    for i in range(0, min(len(x), limit), size):
        yield torch.from_numpy(x[i : min(i + size, limit)])


def _all_sum(values: list[float], device: torch.device, world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _diverged(what: str, epoch: int, step: int, lr: float) -> str:
    return (
        f"training diverged ({what} at epoch {epoch + 1}, step {step + 1}, lr {lr:g}); "
        "nothing written: lower --lr"
    )


@torch.no_grad()
def top1(
    module: OnnxModule,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    logits_index: int = 0,
) -> tuple[int, int]:
    """(correct, count) of the module's eval-mode argmax predictions on (x, y)."""
    was_training = module.training
    module.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[i : i + batch_size]).to(device)
        logits = _logits(module(xb), logits_index)
        pred = torch.where(torch.isfinite(logits).all(1), logits.argmax(1), -1).cpu().numpy()
        correct += int((pred == y[i : i + batch_size]).sum())  # non-finite rows never count
    module.train(was_training)
    return correct, len(x)


def _optimizer(
    module: torch.nn.Module, name: str, lr: float, weight_decay: float, momentum: float
) -> torch.optim.Optimizer:
    # No weight decay on vectors (biases, BN scale/shift): the usual choice for CNNs.
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise BadInputError(f"optimizer must be 'sgd' or 'adamw', not '{name}'")


def retrain(
    model: onnx.ModelProto,
    train_data: Any,
    val_data: Any = None,
    *,
    teacher: onnx.ModelProto | None = None,
    epochs: int = 1,
    lr: float = 0.01,
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
    bn_calibration_samples: int = 1024,
) -> RetrainResult:
    """Retrain `model` on `train_data`; return the written-back model of the best epoch.

    `train_data`/`val_data`: (x, y) arrays or DataSource-like objects (gathered into arrays once);
    y may be None (unlabelled) when a teacher is given.
    The best epoch is the one with the highest validation top-1 (the last one without val data).
    `amp="bf16"` runs forward passes under bf16 autocast; weights and updates stay float32.
    `reinsert_bn`: None (default) re-inserts BatchNorm when the graph is BN-folded (`is_bn_folded`).
    With a teacher (the unreduced graph) the re-inserted BNs take their affine from the teacher's
    conv-output statistics (channels matched by name and bias, `bn.channel_maps`).
    `losses`: {output name: "kl" | "mse" | "none"} overriding the per-output default.
    `features`: intermediate tensor names both graphs have, distilled with normalised MSE.
    """
    start = time.perf_counter()
    if epochs < 1 or batch_size < 1 or not (math.isfinite(lr) and lr > 0):
        raise BadInputError(
            f"epochs and batch_size must be at least 1 and lr a positive number (lr {lr})"
        )
    x_train, y_train = as_arrays(train_data, "training data")
    x_val, y_val = as_arrays(val_data, "validation data") if val_data is not None else (None, None)
    if amp not in AMP_CHOICES:
        raise BadInputError(f"amp must be one of {', '.join(AMP_CHOICES)}, not {amp!r}")
    if y_train is None and teacher is None:
        raise BadInputError("training data has no labels: give labels or a --teacher to distil")
    if features and teacher is None:
        raise BadInputError("feature distillation needs a --teacher")
    if x_val is not None and y_val is None:
        raise BadInputError("validation data has no labels")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    owns_group = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(_dist_backend(dev))
        owns_group = True
    try:
        torch.manual_seed(seed + rank)
        original = untie_initializers(model)  # written back into, in its own dtypes
        model = as_float32(original) if is_low_precision(original) else original
        base = OnnxModule(model).to(dev)
        _check_input(model, base, x_train, "training data")
        local_batch = max(1, batch_size // world)
        probe_x = torch.from_numpy(x_train[: max(2, min(local_batch, len(x_train)))]).to(dev)
        _probe(base, probe_x, "the model")
        del base
        if reinsert_bn is None:
            reinsert_bn = is_bn_folded(model)
        train_model, inserted = model, []
        teacher_module, kinds = None, {}
        if teacher is not None:
            if is_low_precision(teacher):
                teacher = as_float32(teacher)
            # Checked before the teacher's statistics are measured for the re-inserted BNs.
            teacher_module = OnnxModule(with_outputs(teacher, list(features)))
            teacher_module = teacher_module.to(dev).eval().requires_grad_(False)
            _check_input(teacher, teacher_module, x_train, "training data (teacher)")
            teacher_shapes = _probe(teacher_module, probe_x, "the teacher")
        if reinsert_bn:
            # The teacher (the unreduced graph) gives each BN its target statistics.
            calib = _batches(x_train, len(probe_x), bn_calibration_samples)
            train_model, inserted = reinsert_batchnorm(model, calib, teacher)
        student = OnnxModule(with_outputs(train_model, list(features)))
        if x_val is not None:
            _check_input(model, student, x_val, "validation data")
        student.to(dev).train()
        shapes = _probe(student, probe_x, "the model")
        outputs = {o.name: shapes[o.name] for o in model.graph.output}
        logits_name = next((n for n, shp in outputs.items() if is_logits(shp)), None)
        if teacher is not None:
            _check_teacher(outputs, teacher_shapes, features, shapes)
            kinds = choose_losses(outputs, losses)
        elif losses:
            raise BadInputError("--loss chooses distillation losses: it needs a --teacher")
        labels_used = y_train is not None and logits_name is not None
        if y_train is not None and not labels_used and teacher is None:
            raise BadInputError(
                f"the data has labels but the model has no classifier output (batch, classes) "
                f"among {list(outputs)}: retrain it with --teacher"
            )
        if x_val is not None and logits_name is None:
            raise BadInputError("validation top-1 needs a classifier output (batch, classes)")
        logits_index = student.output_names.index(logits_name) if logits_name else 0
        net: torch.nn.Module = student
        if world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                student, device_ids=[dev.index] if dev.type == "cuda" else None
            )

        per_rank = len(x_train) // world
        if per_rank < 2:
            raise BadInputError(f"need at least 2 training samples per process, got {per_rank}")
        steps = math.ceil(per_rank / local_batch)
        if per_rank % local_batch == 1:
            steps -= 1  # a batch of one breaks BatchNorm in train mode: drop it
        opt = _optimizer(student, optimizer, lr, weight_decay, momentum)
        total_steps = epochs * steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
        )
        alpha = distill_alpha if labels_used else 1.0
        show = progress and rank == 0 and sys.stderr.isatty()

        history: list[EpochStats] = []
        best_epoch, best_top1, best_state = 0, -math.inf, None
        train_seconds, images = 0.0, 0
        for epoch in range(epochs):
            t0 = time.perf_counter()
            order = np.random.default_rng([seed, epoch]).permutation(len(x_train))
            mine = order[: per_rank * world][rank::world]
            student.train()
            sums = torch.zeros(3, dtype=torch.float64, device=dev)  # loss*n, correct, n
            bar = progress_bar(steps, f"epoch {epoch + 1}/{epochs}", show, unit="step")
            lr_now = opt.param_groups[0]["lr"]
            for step in range(steps):
                idx = np.sort(mine[step * local_batch : (step + 1) * local_batch])
                xb = torch.from_numpy(x_train[idx]).to(dev, non_blocking=True)
                with _autocast(dev, amp):
                    out = {k: v.float() for k, v in _named(student, net(xb)).items()}
                loss = out[student.output_names[0]].new_zeros(())
                soft = None
                if teacher_module is not None:
                    with torch.no_grad(), _autocast(dev, amp):
                        out_t = _named(teacher_module, teacher_module(xb))
                        soft = {k: v.float() for k, v in out_t.items()}
                    loss = alpha * distillation_loss(out, soft, kinds, temperature)
                    for name in features:
                        loss = loss + alpha * feature_weight * normalised_mse(out[name], soft[name])
                yb = None
                if labels_used:
                    yb = torch.from_numpy(y_train[idx]).to(dev, non_blocking=True)
                    ce = F.cross_entropy(_logits(out[logits_name]), yb)
                    loss = loss + (1 - alpha) * ce if soft is not None else ce
                elif soft is not None and logits_name is not None:
                    # No labels: the teacher's argmax stands in for them (hard pseudo-labels),
                    # weighted as labels would be.
                    yb = _logits(soft[logits_name]).argmax(1)
                    ce = F.cross_entropy(_logits(out[logits_name]), yb)
                    loss = distill_alpha * loss + (1 - distill_alpha) * ce
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if not torch.isfinite(loss):
                    raise BadInputError(_diverged(f"loss {loss.item()}", epoch, step, lr_now))
                opt.step()
                sched.step()
                with torch.no_grad():
                    n = len(idx)
                    hits = (
                        (_logits(out[logits_name]).argmax(1) == yb).sum().double()
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
            train_seconds += time.perf_counter() - t0
            loss_sum, correct, count = _all_sum(sums.tolist(), dev, world)
            images += int(count)

            val_top1 = math.nan
            if x_val is not None:
                shard = np.arange(rank, len(x_val), world)
                c, k = top1(
                    student, x_val[shard], y_val[shard], max(local_batch, 64), dev, logits_index
                )
                c, k = _all_sum([float(c), float(k)], dev, world)
                val_top1 = c / k
            history.append(
                EpochStats(
                    epoch=epoch,
                    train_loss=loss_sum / count,
                    train_acc=correct / count,
                    val_top1=val_top1,
                    lr=lr_now,
                    seconds=time.perf_counter() - t0,
                )
            )
            score = val_top1 if x_val is not None else float(epoch)
            if score > best_top1:
                best_epoch, best_top1 = epoch, score
                best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        if best_state is not None and best_epoch != epochs - 1:
            student.load_state_dict(best_state)
        if inserted:
            _recalibrate_inserted(
                student, inserted, _batches(x_train, len(probe_x), bn_calibration_samples), dev
            )
        student.eval()
        if not all(bool(torch.isfinite(p).all()) for p in student.state_dict().values()):
            raise BadInputError(_diverged("non-finite weights", epochs - 1, steps - 1, lr))
        result_model = fold_back(original, write_back(train_model, student), inserted)
        # Release DDP's reducer and let every rank finish before the group goes:
        # gloo threads still holding work at interpreter exit abort the process.
        del net
        if owns_group:
            dist.barrier()
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
        labels_used=labels_used,
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


def _recalibrate_inserted(
    module: OnnxModule, inserted: list, batches: Any, dev: torch.device
) -> None:
    """Re-measure the re-inserted BNs' running statistics, which lag the trained weights
    (momentum 0.1 over a few steps), so the folded weights compute what training settled on.
    The graph's own BNs keep theirs."""
    own = {n for bn in inserted for n in (bn.mean, bn.var)}
    keep = {
        name: module.initializer(name).detach().clone()
        for name, key in module.initializer_keys.items()
        if name not in own and key in module._buffers
    }
    recalibrate(module, (b.to(dev) for b in batches))
    with torch.no_grad():
        for name, value in keep.items():
            module.initializer(name).copy_(value)


def recalibrate_model(
    model: onnx.ModelProto, data: Any, batch_size: int = 64, device: str = "cpu"
) -> tuple[onnx.ModelProto, int]:
    """`model` with every BatchNorm's running statistics re-estimated on `data` (no training),
    and the number of batches used. A BN-folded graph has nothing to re-estimate: refused."""
    if not has_batchnorm(model):
        raise BadInputError(
            "the model has no BatchNormalization (folded into its Convs): recalibration has "
            "nothing to re-estimate; retrain it instead (BatchNorm is re-inserted there)"
        )
    x, _ = as_arrays(data, "calibration data")
    if len(x) < 2:
        raise BadInputError("BN recalibration needs at least 2 samples")
    original = untie_initializers(model)
    model = as_float32(original) if is_low_precision(original) else original
    module = OnnxModule(model)
    _check_input(model, module, x, "calibration data")
    dev = _pick_device(device, 0)
    module.to(dev).eval()
    count = recalibrate(module, (b.to(dev) for b in _batches(x, batch_size, len(x)) if len(b) > 1))
    return write_back(original, module.eval()), count

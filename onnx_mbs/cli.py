"""The `onnx-mbs` command: thin argument parsing over the Python API.

Exit codes: 0 done, 2 bad input (one line on stderr), 1 a bug (traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from onnx_mbs.console import INTERRUPTED
from onnx_mbs.data.augment import AUGMENT_CHOICES, PAD_CROP_MAX_SIDE
from onnx_mbs.data.sources import default_workers
from onnx_mbs.options import most_threads
from onnx_mbs.passes import (
    DEFAULT_CRITERION,
    DEFAULT_RECEPTIVE_FIELD,
    READINGS,
    BadInputError,
    MissingExtraError,
    QuantizedModelError,
    analyze_model,
    command_line,
    inline_layers,
    load,
    load_model,
    parse_input_shape,
    resolution_text,
    shares_weights,
    static_batch,
)
from onnx_mbs.plan import BASE_RULES, COST_AWARE, COST_WIDTH_MAP, DEFAULT_WIDTH_MAP, STRATEGIES
from onnx_mbs.schedule import DEFAULT_LR_PER_64, DEFAULT_WARMUP


def _input_shapes(specs: Sequence[str] | None) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, dims = parse_input_shape(spec)
        if shapes.get(name, dims) != dims:
            raise BadInputError(
                f"--input-shape gives input '{name}' twice, as {shapes[name]} and {dims}: "
                "give it once"
            )
        shapes[name] = dims
    return shapes


def _fmt_int(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain aligned text table (first column left, the rest right)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[k]) for r in cells) for k in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if k == 0 else c.rjust(w) for k, (c, w) in enumerate(zip(row, widths))
        )

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def cmd_analyze(args: argparse.Namespace) -> int:
    model = load_model(args.model, _input_shapes(args.input_shape))
    analysis = analyze_model(model, args.receptive_field)
    if args.json:
        json.dump(analysis.to_dict(), sys.stdout, indent=2)
        print()
        return 0
    rows = [
        (
            m.index,
            resolution_text(m.resolution),
            len(m.layers),
            len(m.base_layers),
            _fmt_int(m.params),
            _fmt_int(m.macs),
        )
        for m in analysis.macroblocks
    ]
    print(format_table(["macroblock", "resolution", "layers", "base", "params", "MACs"], rows))
    batch = f" at batch {analysis.batch}" if analysis.batch != 1 else ""
    print(
        f"\ntotal: {_fmt_int(analysis.total_params)} params, {_fmt_int(analysis.total_macs)} MACs"
        f"{batch} ({len(analysis.layers)} conv layers; totals include the head)"
    )
    print(f"base: {BASE_RULES[analysis.receptive_field]} (image size {analysis.image_size})")
    if shares_weights(analysis.layers):
        print(
            "params: shared weights are counted once, in the first macroblock that reads them "
            "(convs here read another conv's weights: a tower applied to several inputs)"
        )
    if analysis.uncounted:
        print(analysis.uncounted_text())
    return 0


def _print_reduce_summary(report, args: argparse.Namespace) -> None:
    from onnx_mbs.report import (
        MACROBLOCK_HEADERS,
        budget_text,
        macroblock_legend,
        macroblock_rows,
    )

    plan = report.plan
    err = sys.stderr
    print(f"data: {report.data}", file=err)
    print(f"preprocessing: {report.preprocessing}", file=err)
    if report.samples:
        print(f"statistics: {report.samples} samples on {report.provider}", file=err)
    print(format_table(MACROBLOCK_HEADERS, macroblock_rows(report)))
    for line in macroblock_legend():
        print(line)
    before, after = report.before, report.after
    batch = f", at batch {before.batch}" if before.batch != 1 else ""
    print(
        f"\nparams: {_fmt_int(before.total_params)} -> {_fmt_int(after.total_params)} "
        f"({after.total_params / before.total_params:.1%} kept)   "
        f"MACs: {_fmt_int(before.total_macs)} -> {_fmt_int(after.total_macs)} "
        f"({after.total_macs / before.total_macs:.1%} kept{batch})"
    )
    cut = "nothing cut" if plan.threshold is None else f"cut at {plan.threshold:.4g}"
    if plan.strategy in COST_AWARE:
        knob = f"worth per unit of {plan.price_text}, {cut}"
    elif plan.width_map is None:
        knob = f"one importance ranking over all free groups, {cut}"
    else:
        knob = (
            f"{plan.receptive_field} receptive field, {plan.width_map.kind} width map, "
            f"{plan.width_map.knob} {plan.width_map.value:.4g}, scale {plan.scale:.3f}"
        )
    if plan.budget is not None:
        print(f"budget: {budget_text(plan, 3)} ({plan.strategy}, {knob})")
    else:
        print(f"strategy: {plan.strategy}, {knob}")
    print(f"strategy {plan.strategy}: {plan.strategy_reason}")
    for note in plan.notes:
        print(f"note: {note}")
    for key in ("before", "after"):
        if key in report.accuracy:
            acc = report.accuracy[key]
            # the output read named once, with the note where its shape alone chose it
            read = f" of output '{acc.output}'{_guessed(args)}" if key == "before" else ""
            print(
                f"top-1 {key}: {acc.top1:.2%}{read} on {acc.samples} samples"
                + (" (before retraining)" if key == "after" else "")
            )
    if report.no_top1:
        print(report.no_top1)
    if report.pinned:
        shown = report.pinned[:8]
        more = f" (+{len(report.pinned) - len(shown)} more)" if len(report.pinned) > 8 else ""
        print(f"pinned (kept whole): {'; '.join(shown)}{more}")


def cmd_reduce(args: argparse.Namespace) -> int:
    from onnx_mbs.pipeline import reduce
    from onnx_mbs.report import REPORT_FILES, report_dict, write_report
    from onnx_mbs.save import check_outputs, default_output, save_folder, save_model

    if args.output is None and not args.dry_run:
        args.output = default_output(args.model)
    if args.dry_run:
        args.output = None
    check_outputs(
        args.output,
        args.report,
        models={"the input model": args.model},
        data={"--data": args.data},
        report_files=REPORT_FILES,
    )
    if args.recalibrate and not args.data:
        raise BadInputError("--recalibrate re-estimates BatchNorm statistics on --data: give it")
    _check_runtime_flags(args)
    if args.recalibrate:
        _check_recalibration(args)
    reduced, report = reduce(args.model, args.data, _reduce_options(args))
    recalibration = _recalibrate(reduced, args) if args.recalibrate else None
    if recalibration is not None:
        reduced = recalibration.pop("model")
        report.recalibration = recalibration
    # absolute: a path relative to where the command ran reads as another file from the report
    report.files = {
        "model": os.path.abspath(args.model),
        "written": None if args.output is None else os.path.abspath(args.output),
    }
    if args.json:
        summary = report_dict(report)
        summary.pop("layers")
        print(json.dumps(summary, indent=2))  # one write: dump writes each token
    else:
        _print_reduce_summary(report, args)
        if recalibration is not None:
            top1 = recalibration["top1"]
            print(
                f"BN recalibrated on {recalibration['batches']} batches"
                + ("" if top1 is None else f"; top-1 after recalibration: {top1:.2%}")
            )
    written = None if args.report is None else (args.report, lambda d: write_report(report, d))
    if args.dry_run:
        if written is not None:
            save_folder(*written)
        print("dry run: no model written", file=sys.stderr)
    else:
        save_model(reduced, args.output, written)
        print(f"wrote {args.output}", file=sys.stderr)
    if written is not None:
        print(f"report: {args.report}", file=sys.stderr)
    return 0


def _check_runtime_flags(args: argparse.Namespace) -> None:
    """--latency-threads where nothing is timed (no latency= budget, no --channel-multiple
    auto) could never take effect: refused. --providers where no onnxruntime session is made
    does nothing this time: said on stderr. (bench/experiment.py sets both on every run
    through the Python API, which takes them quietly.)"""
    from onnx_mbs.plan import Budget

    latency = args.budget is not None and "latency" in Budget.parse(",".join(args.budget)).fractions
    timed = latency or args.channel_multiple == "auto"
    if args.latency_threads is not None and not timed:
        raise BadInputError(
            "--latency-threads sets the threads latency is timed with (--budget latency=F, "
            "--channel-multiple auto); this run times nothing: drop it, or give one of those"
        )
    if args.providers != "auto" and not args.data and not timed:
        from onnx_mbs.runtime import check_request

        check_request(args.providers)  # a request it could not run is refused, not noted
        print(
            f"onnx-mbs: --providers {args.providers} does nothing here: nothing runs on "
            "onnxruntime without --data, a latency= budget or --channel-multiple auto",
            file=sys.stderr,
        )


def _reduce_options(args: argparse.Namespace):
    """The ReduceOptions the `reduce` command's flags ask for."""
    from onnx_mbs.options import ReduceOptions

    return ReduceOptions(
        budget=None if args.budget is None else ",".join(args.budget),
        width_map=args.width_map,
        receptive_field=args.receptive_field,
        strategy=args.strategy,
        providers=args.providers,
        input_shapes=_input_shapes(args.input_shape),
        channel_multiple=args.channel_multiple,
        beta_min=args.beta_min,
        importance=args.importance,
        mean=_floats(args.mean, "--mean"),
        std=_floats(args.std, "--std"),
        limit=args.limit,
        batch_size=args.batch_size,
        latency_threads=args.latency_threads or 0,
        evaluate_accuracy=not args.no_eval,
        logits=args.logits,
        progress=not args.json,
    )


def _check_recalibration(args: argparse.Namespace) -> None:
    """What --recalibrate would refuse after the reduction, refused before it: the reduced
    model has the input's BatchNorms, those of the local functions reduce inlines included.
    An unreadable model is left to reduce to refuse. A uint8 input is fed what onnxruntime is
    fed (model-ready data, as it is): its images, preprocessed to floats, reduce refuses."""
    import onnx

    from onnx_mbs.bridge.train import check_recalibration

    try:
        model = inline_layers(onnx.load(args.model, load_external_data=False))
    except Exception:
        return
    check_recalibration(model, args.batch_size)


def _recalibrate(reduced, args: argparse.Namespace) -> dict:
    """Re-estimate the reduced model's BatchNorm statistics on --data; top-1 after, when the data
    has labels (and --no-eval is not given)."""
    from onnx_mbs.bridge import recalibrate_model
    from onnx_mbs.data import to_arrays
    from onnx_mbs.evaluate import evaluate
    from onnx_mbs.logits import has_top1
    from onnx_mbs.runtime import choose_providers

    # Read at --input-shape, as reduce read it: the data is fitted to the size analysed.
    loaded = load_model(reduced, _input_shapes(args.input_shape))
    source = _open_for_model(args.data, loaded, args, args.limit)
    x, y = to_arrays(source)
    model, batches = recalibrate_model(reduced, (x, None), args.batch_size)
    top1 = None
    if y is not None and not args.no_eval and has_top1(model, args.logits):
        providers = choose_providers(args.providers)
        top1 = evaluate(model, source, providers, progress=False, logits=args.logits).top1
    return {"model": model, "batches": batches, "top1": top1}


def _open_for_model(
    spec,
    model,
    args: argparse.Namespace,
    limit: int | None = None,
    split: str | None = "test",
    labels: bool = True,
):
    """A DataSource fitted to `model`'s input, with the command's --mean/--std; the data and
    its preprocessing are printed (by rank 0 alone under torchrun). `labels` False: the labels
    are neither read nor checked."""
    from onnx_mbs.data.fit import open_for_model

    source = open_for_model(
        spec,
        model,
        mean=_floats(args.mean, "--mean"),
        std=_floats(args.std, "--std"),
        limit=limit,
        split=split,
        labels=labels,
        logits=getattr(args, "logits", None),
    )
    if _rank() == 0:
        print(f"data: {source.description}", file=sys.stderr)
        if source.preprocess is not None:
            print(f"preprocessing: {source.preprocess.describe()}", file=sys.stderr)
    return source


def _rank() -> int:
    """This process's rank under torchrun (0 when run alone): only rank 0 prints and writes."""
    return int(os.environ.get("RANK", "0"))


def cmd_eval(args: argparse.Namespace) -> int:
    from onnx_mbs.evaluate import evaluate, load_for_eval
    from onnx_mbs.logits import check_top1_wanted, is_none
    from onnx_mbs.runtime import choose_providers
    from onnx_mbs.weights_file import HeldModel

    providers = choose_providers(args.providers)
    shapes = _input_shapes(args.input_shape)
    read = load_for_eval(args.model, shapes)
    if not args.teacher:
        check_top1_wanted(args.logits, read.model)  # before any data is read
    source = _open_for_model(
        args.data, read.model, args, args.limit, split="test", labels=not args.teacher
    )
    if args.teacher and args.logits and not is_none(args.logits):
        raise BadInputError(
            "--logits picks the output top-1 is read from; eval --teacher compares every "
            "output: drop one of them (it takes --logits none: no output is logits)"
        )
    batch_size = read.batch or args.batch_size
    runnable = HeldModel(read.runnable)  # its only owner: let go once onnxruntime maps it
    del read
    if args.teacher:
        return _eval_agreement(args, runnable, source, providers, shapes)
    result = evaluate(
        runnable,
        source,
        providers,
        batch_size=batch_size,
        progress=not args.json,
        logits=args.logits,
    )
    if args.json:
        json.dump(
            {
                "top1": result.top1,
                "top5": result.top5,
                "samples": result.samples,
                "provider": result.provider,
                "nonfinite": result.nonfinite,
                "output": result.output,
            },
            sys.stdout,
        )
        print()
    else:
        top5 = f", top-5 {result.top5:.2%}" if result.top5 is not None else ""
        print(
            f"top-1 {result.top1:.2%}{top5} of output '{result.output}'{_guessed(args)} on "
            f"{result.samples} samples ({result.provider})"
        )
    if result.nonfinite:
        print(
            f"warning: {result.nonfinite} of {result.samples} samples gave NaN or inf outputs "
            "(counted as wrong)",
            file=sys.stderr,
        )
    return 0


def _guessed(args: argparse.Namespace) -> str:
    """Said after an output taken for logits by its shape alone, so a wrong guess shows."""
    if getattr(args, "logits", None) is not None:
        return ""
    return " (chosen by its shape; --logits none if not a classifier)"


def _eval_agreement(args: argparse.Namespace, model, source, providers, shapes) -> int:
    """`eval --teacher`: how closely each output follows the teacher's, without labels."""
    from onnx_mbs.dense_maps import iou_note
    from onnx_mbs.evaluate import agreement, load_for_eval
    from onnx_mbs.weights_file import HeldModel

    # `model` is a HeldModel, let go once onnxruntime maps it; so is the teacher
    batch_size = static_batch(model.model) or args.batch_size
    teacher = HeldModel(load_for_eval(args.teacher, shapes).runnable)
    result = agreement(
        model,
        teacher,
        source,
        providers,
        batch_size=batch_size,
        progress=not args.json,
        logits=args.logits,
    )
    if args.json:
        # Each output's shape per sample, as the table prints it: the first batch's size
        # is not the model's (a fixed batch is padded, a short last batch is not).
        outputs = {
            o.name: {**{k: v for k, v in vars(o).items() if k != "name"}, "shape": o.shape[1:]}
            for o in result.outputs
        }
        json.dump(
            {"samples": result.samples, "provider": result.provider, "outputs": outputs}, sys.stdout
        )
        print()
        return 0

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2%}"

    rows = [
        (
            o.name,
            "x".join(map(str, o.shape[1:])),
            f"{o.relative_error:.4f}",
            f"{o.cosine:.4f}",
            pct(o.top1),
            pct(o.iou),
        )
        for o in result.outputs
    ]
    print(format_table(["output", "shape", "rel. error", "cosine", "top-1 agree", "IoU"], rows))
    dense = [o.name for o in result.outputs if o.top1 is None and len(o.shape) >= 3]
    if note := iou_note({o.name: o.map for o in result.outputs}, dense):
        print(note)
    print(f"agreement with the teacher on {result.samples} samples ({result.provider})")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    import os

    from onnx_mbs.bridge import checkpoint as ckpt
    from onnx_mbs.bridge import retrain
    from onnx_mbs.bridge.bn import is_bn_folded
    from onnx_mbs.bridge.losses import parse_loss_specs
    from onnx_mbs.bridge.train import check_device, check_one_input, unrunnable_teacher
    from onnx_mbs.data.ready import declared_inputs
    from onnx_mbs.evaluate import check_outputs_finite
    from onnx_mbs.pipeline import check_written
    from onnx_mbs.runtime import choose_providers, require_feedable
    from onnx_mbs.save import check_outputs, save_model

    check_outputs(
        args.output,
        models={"the input model": args.model, "--teacher": args.teacher},
        data={"--data": args.data, "--val": args.val},
        checkpoint=ckpt.path_in(args.checkpoint) if args.checkpoint else None,
    )
    if args.val_limit is not None and not args.val:
        raise BadInputError("--val-limit limits the --val data: give --val, or drop --val-limit")
    if args.no_labels and not args.teacher:
        raise BadInputError(
            "--no-labels leaves only distillation to learn from: give --teacher ORIGINAL, or "
            "drop --no-labels to train on the labels"
        )
    losses = parse_loss_specs(args.loss)
    shapes = _input_shapes(args.input_shape)
    read = load(args.model, shapes)
    check_one_input([i.name for i in declared_inputs(read.model)])
    # The full checker up front, as reduce's written model gets it: a model it rejects (a
    # bfloat16 Conv below opset 22) would only be written back invalid, after the training.
    runnable = read.runnable
    check_written(runnable, lambda: read.original)
    # Trained in the written form: the shape arithmetic that follows the batch and image
    # size computed at run time, so any batch trains and the result takes every shape.
    model = runnable
    try:
        teacher = load(args.teacher, shapes).runnable if args.teacher else None
    except QuantizedModelError as error:  # its own advice is reduce's: the teacher's differs
        raise unrunnable_teacher(f"a {str(error).partition(':')[0]}") from None
    check_device(args.device)
    train = _open_for_model(
        args.data, read.model, args, args.limit, split="train", labels=not args.no_labels
    )
    val = (
        _open_for_model(args.val, read.model, args, args.val_limit, split=None)
        if args.val
        else None
    )
    for data in (train, val) if val is not None else (train,):
        require_feedable(runnable, data)  # images for a uint8 input: before any training
    rank = _rank()
    if args.no_bn_reinsert and rank == 0 and not is_bn_folded(runnable):
        print(
            "onnx-mbs: --no-bn-reinsert does nothing here: the model keeps its BatchNorms, "
            "which train as they are (only BN-folded graphs get BatchNorm re-inserted)",
            file=sys.stderr,
        )
    try:
        result = retrain(
            model,
            train,
            val,
            teacher=teacher,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            optimizer=args.optimizer,
            seed=args.seed,
            device=args.device,
            amp=args.amp,
            progress=rank == 0,
            reinsert_bn=False if args.no_bn_reinsert else None,
            losses=losses,
            features=args.feature or (),
            augment=args.augment,
            label_smoothing=args.label_smoothing,
            warmup=args.warmup,
            checkpoint=args.checkpoint,
            resume=args.resume,
            workers=args.workers,
            logits=args.logits,
            freeze=[n for spec in args.freeze or () for n in spec.split(",")],
        )
    except KeyboardInterrupt:
        if args.checkpoint and rank == 0 and ckpt.path_in(args.checkpoint).exists():
            print(
                f"onnx-mbs: {args.checkpoint} holds every finished epoch: rerun with --resume "
                "to continue",
                file=sys.stderr,
            )
        elif args.checkpoint and rank == 0 and os.path.isdir(args.checkpoint):
            print(
                f"onnx-mbs: no epoch finished: {args.checkpoint} holds no checkpoint yet",
                file=sys.stderr,
            )
        elif args.checkpoint and rank == 0:  # not made yet, or made and removed (remove_made)
            print(
                f"onnx-mbs: no epoch finished: no checkpoint was written, {args.checkpoint} "
                "is not left behind",
                file=sys.stderr,
            )
        raise
    if rank == 0:
        if result.bn_reinserted:
            print(
                f"BN-folded graph: {result.bn_reinserted} BatchNorm(s) re-inserted for training, "
                "folded back into their Convs",
                file=sys.stderr,
            )
        if result.losses:
            chosen = ", ".join(
                f"{n}={k}"
                + " on the class scores its ArgMax reads" * (n in result.scores)
                + (f" (the same as {result.shared[n]}: counted once)" if n in result.shared else "")
                for n, k in result.losses.items()
            )
            if any(k == "kl" and n not in result.scores for n, k in result.losses.items()):
                chosen += _guessed(args)  # a classifier output found by its shape
            # Without labels the teacher's top-1 stands in for them (`retrain`).
            pseudo = "; + cross-entropy on the teacher's top-1 (pseudo-labels)"
            labels = (
                "+ cross-entropy on labels"
                if result.labels_used
                else "no labels used" + pseudo * (result.logits is not None)
            )
            print(f"distillation: {chosen}; {labels}", file=sys.stderr)
        elif result.logits is not None:
            print(f"cross-entropy on output '{result.logits}'{_guessed(args)}", file=sys.stderr)

        def val_text(top1: float, agreement: float) -> str:
            if not math.isnan(agreement):
                return f"val agreement with the teacher {agreement:.2%}"
            return "no validation data" if math.isnan(top1) else f"val top-1 {top1:.2%}"

        # What picked it: a labelled --val's labels, with --no-labels too (it ignores --data's).
        by = (
            "top-1 against the --val labels"
            if val is not None and val.labels is not None
            else "agreement with the teacher on --val"
        )
        kept = f"best epoch {result.best_epoch + 1} (by {by})" if args.val else "last epoch"
        speed = (
            f"nothing left to train (the checkpoint held all {args.epochs} epoch(s))"
            if result.resumed_from >= args.epochs
            else f"{result.images_per_second:.0f} images/s on {result.device} x{result.world_size}"
        )
        written = result.model  # trained in the written form
        check_written(written, runnable)
        check_outputs_finite(
            written, runnable, train, choose_providers("cpu"), batch_size=read.batch or 64
        )
        save_model(written, args.output)
        print(f"wrote {args.output}", file=sys.stderr)
        # After the save: a stdout that cannot be written (a full disk) costs no training.
        print(f"{kept}: {val_text(result.val_top1, result.val_agreement)}; {speed}")
    if result.world_size > 1:
        # The work is done and written. torch's gloo teardown can still abort a
        # finished rank at interpreter exit (pytorch/pytorch#179291): leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _floats(text: str | None, option: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise BadInputError(f"{option} expects comma-separated numbers, got {text!r}") from None


def _number(kind: type, low: float, high: float = math.inf):
    """An argparse type: a finite `kind` in [low, high] (argparse turns the error into exit 2)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "whole number" if kind is int else "number"
            raise argparse.ArgumentTypeError(f"{text!r} is not a {what}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} is not in [{low:g}, {high:g}]")
        return value

    parse.__name__ = kind.__name__
    return parse


COUNT = _number(int, 1)


def _path(text: str) -> str:
    """An argparse type: a path that is not empty (`--teacher "$TEACHER"` with TEACHER unset
    would otherwise read as the option not given, or as the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: give a file or folder, or leave it out")
    return text


SEED = _number(int, 0, 2**32 - 1)


def _channel_multiple(text: str) -> int | str:
    return text if text == "auto" else COUNT(text)


def version_text() -> str:
    """`onnx-mbs --version`: this package's version and the onnx and onnxruntime it runs on."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(*names: str) -> str:
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                continue
        return "not installed"

    return (
        f"onnx-mbs {installed('onnx-mbs')} (onnx {installed('onnx')}, "
        f"onnxruntime {installed('onnxruntime-gpu', 'onnxruntime')})"
    )


def says_default(action: argparse.Action) -> bool:
    """Whether `--help` owes this action's default: options that take a value and are not
    required (a flag is off until given)."""
    return bool(action.option_strings) and action.nargs != 0 and not action.required


def with_default(action: argparse.Action) -> str | None:
    """`action`'s help ending with its default ("none": unset until given), unless its text
    says it already."""
    text = action.help or ""
    if "default" in text or not says_default(action):
        return action.help
    shown = "none" if action.default is None else "%(default)s"
    return f"{text} (default: {shown})".lstrip()


class _Parser(argparse.ArgumentParser):
    """Usage errors are bad input too: one line, exit code 2. Help says every default."""

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        action.help = with_default(action)
        return action

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


class _DefaultsShown(argparse.HelpFormatter):
    """Help that states every option's default (unless its text already does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnx-mbs",
        description="Macroblock Scaling for ONNX CNNs: ONNX in, smaller ONNX out.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = parser.add_subparsers(dest="command", required=True)

    def add_input_shape(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--input-shape",
            action="append",
            metavar="NAME:DIMS",
            help="fix a dynamic input shape, e.g. input:1,3,224,224 (repeatable)",
        )

    def add_logits(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--logits",
            metavar="OUTPUT",
            help="the output holding the class scores, where several outputs are "
            "(batch, classes) (default: the only one; a Softmax output is trained on its input); "
            "'none': the model has no classifier output (a (batch, 4) box or other regression "
            "head is not taken for logits by its shape: no top-1, mse distillation)",
        )

    def add_data_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mean", help="per-channel mean after /255 (default: model metadata or 0)")
        p.add_argument("--std", help="per-channel std (default: model metadata or 1)")
        p.add_argument(
            "--limit", type=COUNT, help="use N samples (class folders: each class in turn)"
        )

    def add_receptive_field(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--receptive-field",
            metavar="|".join(READINGS),
            default=DEFAULT_RECEPTIVE_FIELD,
            help="what a macroblock's base is measured by: global (default; input pixels "
            "against the input image) or local (the macroblock's own pixels and map)",
        )

    p = sub.add_parser("analyze", help="macroblocks, receptive fields, params and MACs")
    p.add_argument("model", help="ONNX model file")
    add_input_shape(p)
    add_receptive_field(p)
    p.add_argument("--json", action="store_true", help="print a JSON document on stdout")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("reduce", help="shrink Conv widths per macroblock with MBS")
    p.add_argument("model", help="ONNX model file")
    p.add_argument(
        "-o",
        "--output",
        type=_path,
        help="where to write the reduced model (default: MODEL with .mbs.onnx next to it)",
    )
    p.add_argument(
        "--data",
        type=_path,
        help="calibration data: image folder, .npz (x, y) or IDX folder[:train|:test], "
        "preprocessed to the image input; or a model-ready .npz with one array per model "
        "input, named after it (first axis: samples), fed as it is (audio, video, several "
        "inputs; see docs/data.md); without it every activation ratio is 1 (MACs and "
        "receptive fields only)",
    )
    p.add_argument(
        "--budget",
        action="append",
        help="fraction of the model to keep: params=F, flops=F or latency=F (measured on "
        "--providers); combine with commas (or repeat the flag) to meet all, e.g. "
        "params=0.5,flops=0.6",
    )
    p.add_argument(
        "--width-map",
        default=None,
        help=f"beta from redundancy R: linear:C (1 - C*R) or power:GAMMA ((1 - R)^GAMMA); "
        f"default {DEFAULT_WIDTH_MAP} ({COST_WIDTH_MAP} under mbs-cost and mbs-branch, "
        "whose worth it weighs); with --budget, C or GAMMA is solved (not under those two)",
    )
    add_receptive_field(p)
    p.add_argument(
        "--strategy",
        choices=("auto", *STRATEGIES),
        default="auto",
        help="auto (default): chosen per budget metric from the experiment's results (the "
        "report says which and why); mbs; mbs-cost: MBS's worth of each channel against its "
        "cost in the budget's metric; mbs-branch: mbs-cost cutting residual branches before "
        "the streams they join; uniform: one width scale everywhere; global: one "
        "importance ranking over all groups, the lowest cut (see --importance); without "
        "--budget, the others are matched to MBS's size",
    )
    p.add_argument("--providers", default="auto", help="auto (default), cpu or cuda")
    add_input_shape(p)
    p.add_argument(
        "--channel-multiple",
        type=_channel_multiple,
        default=8,
        help="kept channel counts are multiples of this (default 8); auto: chosen for the "
        "provider (8 on CPU, measured on CUDA)",
    )
    p.add_argument(
        "--latency-threads",
        type=_number(int, 0, most_threads()),
        default=None,
        help="onnxruntime threads for latency=F and --channel-multiple auto measurements "
        f"(default 0: one per core; at most the {most_threads()} cores of this machine)",
    )
    p.add_argument(
        "--beta-min", type=_number(float, 1e-9, 1), default=0.1, help="smallest width scale"
    )
    p.add_argument(
        "--importance",
        default="auto",
        help="which channels a group keeps: act (mean |activation|; needs --data), l1 or l2 "
        "(filter norms), bn (filter norm times BatchNorm scale); default auto: act with "
        f"--data, else {DEFAULT_CRITERION} (bench/importance.py)",
    )
    add_data_options(p)
    p.add_argument("--batch-size", type=COUNT, default=64)
    p.add_argument(
        "--report", metavar="DIR", type=_path, help="write report.json, report.md, widths.png"
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write no model")
    p.add_argument("--no-eval", action="store_true", help="skip accuracy before/after")
    add_logits(p)
    p.add_argument(
        "--recalibrate",
        action="store_true",
        help="re-estimate BatchNorm statistics of the reduced model on --data (no training)",
    )
    p.set_defaults(func=cmd_reduce)

    p = sub.add_parser(
        "retrain",
        help="retrain a (reduced) model through PyTorch",
        description="Retrain a (reduced) model through PyTorch, optionally distilling from the "
        "original (--teacher). The last line says what was kept; every epoch prints a line "
        "(loss, accuracy, validation, images/s, time, ETA) on stderr when it ends.",
        formatter_class=_DefaultsShown,
    )
    p.add_argument("model", help="ONNX model file (BatchNorm kept or folded)")
    p.add_argument(
        "-o", "--output", required=True, type=_path, help="where to write the retrained model"
    )
    p.add_argument(
        "--data",
        required=True,
        type=_path,
        help="training data (see reduce); labels are optional with --teacher",
    )
    p.add_argument(
        "--val",
        type=_path,
        help="validation data; the best epoch on it is kept (by top-1 with labels, by "
        "agreement with --teacher without)",
    )
    p.add_argument(
        "--val-limit", type=COUNT, help="use N validation samples (as --limit takes them)"
    )
    p.add_argument(
        "--teacher", type=_path, help="original model to distil from (knowledge distillation)"
    )
    p.add_argument("--epochs", type=COUNT, default=1, help="passes over the training data")
    p.add_argument(
        "--lr",
        type=_number(float, 1e-12),
        help=f"peak learning rate (default: {DEFAULT_LR_PER_64:g} x batch-size / 64, the "
        "linear scaling rule)",
    )
    p.add_argument(
        "--batch-size",
        type=COUNT,
        default=64,
        help="global batch (all processes; a multiple of their count)",
    )
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="optimizer")
    p.add_argument(
        "--warmup",
        type=_number(float, 0.0, 0.999),
        default=DEFAULT_WARMUP,
        help="fraction of the steps warming up linearly to --lr, before a cosine decay to 0",
    )
    p.add_argument(
        "--label-smoothing",
        type=_number(float, 0.0, 0.999),
        default=0.0,
        help="label smoothing of the cross-entropy terms",
    )
    p.add_argument(
        "--augment",
        choices=AUGMENT_CHOICES,
        default="auto",
        help="standard: random crop (padded by 1/8 for inputs up to "
        f"{PAD_CROP_MAX_SIDE} px, else a random resized crop) and horizontal flip, on the "
        "input student and teacher both see; auto: standard for image data (an image folder, "
        "npz or IDX files) read into an (N, C, H, W) or (N, H, W, C) input, else none",
    )
    p.add_argument(
        "--workers",
        type=_number(int, 0),
        default=default_workers(),
        help="processes decoding, resizing and augmenting data (0: the training process); "
        f"the samples and their order do not depend on it (default: the cores, "
        f"{default_workers()} here)",
    )
    p.add_argument(
        "--checkpoint",
        type=_path,
        metavar="DIR",
        help="write DIR/checkpoint.pt after every epoch (weights, optimizer, schedule, "
        "random states, best so far)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint DIR (same model, data and options); starts at epoch 1 "
        "when DIR has no checkpoint yet",
    )
    p.add_argument("--seed", type=SEED, default=0, help="seeds data order, augmentation, dropout")
    p.add_argument("--device", default="auto", help="auto (CUDA when there), cpu or cuda")
    p.add_argument(
        "--amp", choices=["off", "bf16"], default="off", help="bf16 autocast for forward passes"
    )
    p.add_argument(
        "--no-labels",
        action="store_true",
        help="ignore the --data labels: distil from --teacher (a labelled --val still picks the "
        "best epoch by top-1 against its labels)",
    )
    p.add_argument(
        "--loss",
        action="append",
        metavar="OUTPUT=KIND",
        help="distillation loss of one output: kl (logits), mse (normalised) or none; default "
        "kl for (batch, classes) outputs, mse otherwise, mse for all with --logits none "
        "(repeatable)",
    )
    p.add_argument(
        "--freeze",
        action="append",
        metavar="NAME[,NAME...]",
        help="initializers kept as they are: not trained, no weight decay, written back "
        "unchanged (a detector's stride or DFL tables; repeatable)",
    )
    p.add_argument(
        "--feature",
        action="append",
        metavar="TENSOR",
        help="also distil this intermediate tensor, present in both graphs (repeatable)",
    )
    p.add_argument(
        "--no-bn-reinsert",
        action="store_true",
        help="BN-folded graphs: train the folded weights as they are (default: re-insert "
        "BatchNorm for training and fold it back)",
    )
    add_logits(p)
    add_input_shape(p)
    add_data_options(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "eval", help="top-1/top-5 accuracy, or agreement with a teacher, with onnxruntime"
    )
    p.add_argument("model", help="ONNX model file")
    p.add_argument(
        "--data",
        required=True,
        type=_path,
        help="labelled data, or any images with --teacher (see reduce)",
    )
    p.add_argument(
        "--teacher",
        type=_path,
        help="report agreement with this model's outputs instead of accuracy (no labels needed)",
    )
    p.add_argument("--providers", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--batch-size", type=COUNT, default=256)
    p.add_argument(
        "--json",
        action="store_true",
        help='print {"top1", "top5", "samples", ...} on stdout (with --teacher: per output)',
    )
    add_logits(p)
    add_input_shape(p)
    add_data_options(p)
    p.set_defaults(func=cmd_eval)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every temporary file is cleaned up the same way."""


class HungUp(Terminated):
    """SIGHUP (the terminal closed, or torchrun passing it on), ended as SIGTERM is: Python's
    default died on the spot, leaving an empty --checkpoint folder and temporary files."""


_HANGUP = getattr(signal, "SIGHUP", None)  # none on Windows
_ENDING = tuple(s for s in (signal.SIGTERM, _HANGUP) if s is not None)


def _terminate(signum: int, frame: object) -> None:
    # Once: the clean-up this starts is not cut short by a repeat (torchrun killed outright
    # sends its ranks one SIGTERM per thread it loses, `end_rank_with_launcher`).
    for number in _ENDING:
        if signal.getsignal(number) is _terminate:
            signal.signal(number, signal.SIG_IGN)
    raise HungUp if signum == _HANGUP else Terminated


@contextmanager
def _termination_handled() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Terminated while a command runs and until its answer is given
    (the handlers restored only after, when what the run held, data-loader workers too, is
    gone). A SIGHUP ignored (`nohup`) stays ignored. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate)}
    if _HANGUP is not None and signal.getsignal(_HANGUP) == signal.SIG_DFL:
        previous[_HANGUP] = signal.signal(_HANGUP, _terminate)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class _CheckedStdout:
    """sys.stdout for one command: a write that fails (a full disk, stdout closed with `>&-`)
    is an environment fault, one line and exit 2, not a traceback nor lines dropped unseen
    (print() to a closed stdout, None, does nothing). A reader gone stays BrokenPipeError."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def _call(self, name: str, *args):
        if self._stream is None:
            raise BadInputError(
                "cannot write to stdout: it is closed (redirect it to a file or /dev/null)"
            )
        try:
            return getattr(self._stream, name)(*args)
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as error:  # ValueError: I/O on a closed file
            raise BadInputError(
                f"cannot write to stdout: {getattr(error, 'strerror', None) or error}"
            ) from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextmanager
def _checked_stdout() -> Iterator[None]:
    """Run a command with _CheckedStdout; what it printed is flushed inside, where a failure is
    still answered in one line (at the interpreter's exit it is a traceback and exit 120)."""
    real = sys.stdout
    sys.stdout = _CheckedStdout(real)
    try:
        yield
        sys.stdout.flush()
    finally:
        sys.stdout = real


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what the closed pipe did
    not take raises no second BrokenPipeError (Python's documented recipe)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    with _termination_handled():
        return _answered(args)


def _answered(args: argparse.Namespace) -> int:
    """Run the command; its failure or interruption answered in one line and an exit code."""
    try:
        with command_line(), _checked_stdout():  # messages name the flags
            return args.func(args)
    except (BadInputError, MissingExtraError) as e:
        print(f"onnx-mbs: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:  # the sizes that can be checked beforehand are (onnx_mbs/memory.py)
        print(
            "onnx-mbs: error: out of memory; nothing written (use a smaller --batch-size or "
            "--input-shape, or a machine with more memory)",
            file=sys.stderr,
        )
        return 2
    except HungUp:
        print("onnx-mbs: hung up; nothing written", file=sys.stderr)
        return 129
    except Terminated:
        print("onnx-mbs: terminated; nothing written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except BrokenPipeError:  # `onnx-mbs analyze M | head`: the reader has gone
        _stdout_to_devnull()
        return 141  # 128 + SIGPIPE, as a pipeline reports a writer its reader closed on

"""Field sweep: timm CNN architectures through `onnx-mbs reduce`, every output checked.

    nice python bench/timm_sweep.py                      # resumes bench/results/timm_sweep.json
    nice python bench/timm_sweep.py --models resnet10t --exporters legacy --fresh

Each architecture (random weights, `pretrained=False`: nothing is downloaded; 10 classes) is
exported at a small input with torch's TorchScript exporter (`dynamo=False`, dynamic batch)
and its dynamo exporter (dynamic batch where torch can export one, else static), then:

- keep-all: `onnx-mbs reduce --strategy mbs --width-map linear:0` (beta = 1 everywhere) must
  write a model whose outputs equal the original's in onnxruntime (batch 1 and 3);
- default (`onnx-mbs reduce`, no data), `--budget params=0.5` (the command line) and
  `budget="flops=0.5"` (the Python API): the written model passes `onnx.checker`'s full
  check, keeps the input and output names, runs at batch 1 and 3 where the batch is dynamic
  with outputs of the original's shapes, and its reported parameter count equals an
  independent count of the written file (`count_params`, below); the original's count is
  compared with torch's `parameters()` (less the BatchNorm scales an export folds);
- dead (Python API, `dead_channels`): every channel kept through `shrink_channels` computes
  the same, and cutting channels made provably zero computes what the model with them does.

A refusal (exit 2) is recorded with its line; anything else that fails is recorded with the
last line of its traceback. One row per (model, exporter) is written to the JSON file as it
finishes; the file says `partial` until every row asked for is there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import onnx

RESULTS = Path(__file__).parent / "results" / "timm_sweep.json"

# (name, input size): the smallest size each accepts comfortably; families in comments.
MODELS: list[tuple[str, int]] = [
    ("resnet10t", 64),  # resnet, deep stem
    ("resnet14t", 64),
    ("resnext26ts", 64),  # grouped bottlenecks
    ("seresnext26t_32x4d", 64),  # squeeze-excitation
    ("ecaresnet26t", 64),  # ECA: a Conv1d over the channel axis
    ("skresnet18", 64),  # selective kernel
    ("resnest14d", 64),  # split attention (radix softmax over reshaped channels)
    ("res2net50_14w_8s", 64),  # hierarchical splits
    ("regnetx_002", 64),
    ("regnety_002", 64),
    ("efficientnet_b0", 64),
    ("mobilenetv3_small_050", 64),
    ("mobilenetv4_conv_small", 64),
    ("mixnet_s", 64),  # mixed kernel sizes (split channels)
    ("tinynet_e", 64),
    ("semnasnet_050", 64),
    ("fbnetc_100", 64),
    ("lcnet_050", 64),
    ("hardcorenas_a", 64),
    ("ghostnet_050", 64),
    ("ghostnetv2_100", 64),
    ("repghostnet_050", 64),
    ("dla46_c", 64),
    ("dpn48b", 64),
    ("densenet121", 64),
    ("hrnet_w18_small", 64),
    ("rexnet_100", 64),
    ("nf_resnet26", 64),  # weight standardisation
    ("nf_regnet_b0", 64),
    ("cspresnet50", 64),
    ("cs3darknet_focus_s", 64),  # space-to-depth by slicing
    ("ese_vovnet19b_dw", 64),
    ("selecsls42b", 64),
    ("mobileone_s0", 64),
    ("repvgg_a0", 64),
    ("convnext_atto", 64),
    ("xception41p", 64),
    ("inception_v3", 96),
    ("gernet_s", 64),
    ("efficientvit_b0", 64),
    ("tresnet_m", 64),
]
EXPORTERS = ("legacy", "dynamo")
BATCHES = (1, 3)


def build(name: str):
    """The timm model, random weights, BatchNorm statistics randomized (an untrained BN is
    the identity, which would hide a wrong cut), in eval mode."""
    import torch

    from onnx_mbs.models.export import randomize_batchnorm
    from onnx_mbs.models.torchvision_cpu import import_torchvision

    import_torchvision()
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    return randomize_batchnorm(model).eval()


def export(model, size: int, exporter: str, path: Path) -> dict:
    """Export as users do; returns what was exported (dynamic batch or not, and why not)."""
    import torch

    shape = (1, 3, size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            axes = {"input": {0: "batch"}, "logits": {0: "batch"}}
            torch.onnx.export(model, (torch.zeros(shape),), str(path), input_names=["input"],
                              output_names=["logits"], opset_version=17, dynamo=False,
                              dynamic_axes=axes)  # fmt: skip
            return {"dynamic_batch": True}
        x = torch.randn(2, *shape[1:])
        batch = torch.export.Dim("batch", min=1, max=64)
        try:
            program = torch.onnx.export(model, (x,), dynamo=True, input_names=["input"],
                                        output_names=["logits"],
                                        dynamic_shapes=({0: batch},), verbose=False)  # fmt: skip
            info = {"dynamic_batch": True}
        except Exception as error:  # noqa: BLE001 - fall back to a static batch
            program = torch.onnx.export(model, (torch.zeros(shape),), dynamo=True,
                                        input_names=["input"], output_names=["logits"],
                                        verbose=False)  # fmt: skip
            info = {"dynamic_batch": False, "why_static": _last_line(str(error))}
        program.save(str(path))
        return info


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def count_params(model: onnx.ModelProto) -> int:
    """An independent parameter count: float initializers read as a weight (Conv, ConvTranspose,
    Gemm, MatMul, the normalisations' scale and bias, PRelu's slope) or multiplied/added
    per channel (gains, layer scales: more than one element); a BatchNorm's running statistics
    and scalar constants are not parameters. Each tensor counts once; weights computed from
    initializers (weight standardisation) count the initializers they are computed from."""
    floats = {t.name: t for t in model.graph.initializer if t.data_type in (1, 10, 11, 16)}
    weight_slots = {
        "Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (0, 1, 2), "MatMul": (0, 1),
        "BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
        "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2), "PRelu": (1,),
    }  # fmt: skip
    used: set[str] = set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name not in floats:
                continue
            size = math.prod(floats[name].dims)
            if k in weight_slots.get(node.op_type, ()) or (
                node.op_type in ("Mul", "Add", "Sub", "Div") and size > 1
            ):
                used.add(name)
    # weight standardisation: a Conv weight computed from initializers (Reshape, BN(training),
    # Mul by a gain): those reached backwards from a Conv's weight slot, through ops other
    # than the convs themselves, count too
    producer = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        stack, seen = [node.input[1]], set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in floats and math.prod(floats[name].dims) > 1:
                statistic = any(
                    n.op_type == "BatchNormalization" and name in n.input[3:5]
                    for n in model.graph.node
                )
                if not statistic:
                    used.add(name)
            if name in producer:
                stack.extend(producer[name].input)
    return sum(math.prod(floats[n].dims) for n in used)


def session(model: onnx.ModelProto | str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    data = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def feeds_for(path: Path, size: int, dynamic: bool) -> list[np.ndarray]:
    batches = BATCHES if dynamic else (1,)
    return [np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32)
            for b in batches]  # fmt: skip


def outputs(path: Path, xs: list[np.ndarray]) -> list[list[np.ndarray]]:
    s = session(str(path))
    name = s.get_inputs()[0].name
    return [s.run(None, {name: x}) for x in xs]


def check_written(original: Path, written: Path, xs, expected, exact: bool) -> dict:
    """What the checks found for one written model."""
    from onnx_mbs.passes import count_parameters

    out: dict = {}
    model = onnx.load(written)
    try:
        onnx.checker.check_model(model, full_check=True)
        out["checker"] = "ok"
    except Exception as error:  # noqa: BLE001
        out["checker"] = _last_line(str(error))
    first = onnx.load(original)
    out["io_names_kept"] = _io(model) == _io(first)
    try:
        got = outputs(written, xs)
        out["ran_batches"] = [int(x.shape[0]) for x in xs]
        shapes_ok = all([a.shape for a in g] == [b.shape for b in e] for g, e in zip(got, expected))
        out["shapes_kept"] = shapes_ok
        out["finite"] = all(np.isfinite(a).all() for g in got for a in g)
        if exact:
            out["max_abs_diff"] = float(max(np.abs(a - b).max() for g, e in zip(got, expected)
                                            for a, b in zip(g, e)))  # fmt: skip
    except Exception as error:  # noqa: BLE001
        out["run_error"] = _last_line(str(error))
    out["params_ours"] = count_params(model)
    out["params_onnx_mbs_count"] = count_parameters(model)
    return out


def _io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    weights = {t.name for t in model.graph.initializer}
    return ([i.name for i in model.graph.input if i.name not in weights],
            [o.name for o in model.graph.output])  # fmt: skip


def dead_channels(original: Path) -> dict:
    """Oracles on the channel analysis itself (Python API): keeping every channel through
    `shrink_channels` (not the hand-back of a plan that cuts nothing) computes the same, and
    where a third of every free group's channels are made provably zero (`kill_channels`:
    their producers' filters, biases and shifts zeroed), cutting exactly those computes
    what the killed model computes (groups the analysis marks not exact are left whole)."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
    from graphs import kill_channels  # the tests' helper: one definition of "provably zero"

    from onnx_mbs.passes import load_model, shrink_channels
    from onnx_mbs.passes.channel_groups import analyze_channels

    loaded = load_model(onnx.load(original))
    channels = analyze_channels(loaded)
    shape = [d.dim_value or 1 for d in loaded.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    run = lambda m: session(m).run(None, {m.graph.input[0].name: x})  # noqa: E731
    every = {g.id: np.arange(g.size) for g in channels.groups}
    same = [run(loaded), run(shrink_channels(loaded, every, channels))]
    free = [g for g in channels.groups if not g.pinned and g.size > 1]
    exact = [g for g in free if not g.inexact]
    drop = {g.id: list(range(1, g.size, 3)) for g in exact}
    killed = kill_channels(loaded, channels.groups, drop)
    keep = {g: np.setdiff1d(np.arange(channels.groups[g].size), d) for g, d in drop.items()}
    cut = [run(killed), run(shrink_channels(killed, keep, analyze_channels(killed)))]
    scale = max(1.0, *(float(np.abs(y).max()) for y in cut[0]))
    return {
        "groups": len(channels.groups),
        "free": len(free),
        "not_exact": len(free) - len(exact),
        "keepall_shrink_max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(*same))),
        "dead_cut_rel_diff": float(max(np.abs(a - b).max() for a, b in zip(*cut))) / scale,
    }


def reduce_case(label: str, original: Path, folder: Path, xs, expected, size: int) -> dict:
    """One reduction of `original`: through the command line or the Python API."""
    import onnx_mbs

    written = folder / f"{label}.onnx"
    report_json = folder / f"{label}.json"
    row: dict = {}
    start = time.time()
    if label == "flops":  # the Python API
        try:
            small, report = onnx_mbs.reduce(str(original), None, budget="flops=0.5",
                                            progress=False)  # fmt: skip
            onnx_mbs.save_model(small, written)
            row["rc"] = 0
            plan = report.plan
            row["reported_params"] = list(plan.params)
            row["reported_macs"] = list(plan.macs)
            row["reached"] = dict(plan.reached)
        except onnx_mbs.BadInputError as error:
            row["rc"], row["refused"] = 2, str(error)
        except Exception as error:  # noqa: BLE001
            row["rc"] = 1
            row["error"] = f"TRACEBACK: {_last_line(traceback.format_exc())} ({error!r:.200})"
    else:
        args = ["reduce", str(original), "-o", str(written), "--json", "--no-eval"]
        args += {"keepall": ["--strategy", "mbs", "--width-map", "linear:0"],
                 "default": [], "params": ["--budget", "params=0.5"]}[label]  # fmt: skip
        done = subprocess.run([sys.executable, "-m", "onnx_mbs", *args], capture_output=True,
                              text=True, timeout=900)  # fmt: skip
        row["rc"] = done.returncode
        if done.returncode == 0:
            try:
                summary = json.loads(done.stdout)
                report_json.write_text(done.stdout)
                row["reported_params"] = _find(summary, "params")
                row["reported_macs"] = _find(summary, "macs")
                row["reached"] = _find(summary, "reached")
            except ValueError:
                row["json_error"] = done.stdout[-300:]
        elif done.returncode == 2 and "Traceback" not in done.stderr:
            row["refused"] = _last_line(done.stderr)
            row["refusal_lines"] = len(done.stderr.strip().splitlines())
        else:
            row["error"] = "TRACEBACK: " + _last_line(done.stderr)
    row["seconds"] = round(time.time() - start, 1)
    if row["rc"] == 0 and written.exists():
        row |= check_written(original, written, xs, expected, exact=label == "keepall")
        reported = row.get("reported_params")
        if isinstance(reported, dict):
            reported = [reported["before"], reported["after"]]
        if isinstance(reported, list) and len(reported) == 2:
            row["params_ratio"] = round(reported[1] / reported[0], 4) if reported[0] else None
            row["params_match"] = reported[1] == row["params_ours"]
    return row


def _find(doc, key: str):
    """The first value under `key` anywhere in a JSON document."""
    if isinstance(doc, dict):
        if key in doc:
            return doc[key]
        for value in doc.values():
            found = _find(value, key)
            if found is not None:
                return found
    if isinstance(doc, list):
        for value in doc:
            found = _find(value, key)
            if found is not None:
                return found
    return None


def sweep_one(name: str, size: int, exporter: str) -> dict:
    import torch

    row: dict = {"model": name, "exporter": exporter, "size": size}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        original = folder / "model.onnx"
        try:
            model = build(name)
            row["torch_params"] = sum(p.numel() for p in model.parameters())
            # what torch counts less the BatchNorm scales an export folds into convs
            row["torch_params_bn_folded"] = row["torch_params"] - sum(
                m.weight.numel()
                for m in model.modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine
            )
            row |= export(model, size, exporter, original)
        except Exception:  # noqa: BLE001 - an export failure is torch's or timm's, recorded
            row["export_error"] = _last_line(traceback.format_exc())
            return row
        first = onnx.load(original)
        row["nodes"] = len(first.graph.node)
        row["onnx_params_ours"] = count_params(first)
        xs = feeds_for(original, size, row["dynamic_batch"])
        try:
            expected = outputs(original, xs)
        except Exception:  # noqa: BLE001
            row["original_run_error"] = _last_line(traceback.format_exc())
            return row
        for label in ("keepall", "default", "params", "flops"):
            row[label] = reduce_case(label, original, folder, xs, expected, size)
            print(f"  {name}/{exporter}/{label}: {_brief(row[label])}", flush=True)
        try:
            row["dead"] = dead_channels(original)
        except Exception:  # noqa: BLE001
            row["dead"] = {"error": "TRACEBACK: " + _last_line(traceback.format_exc())}
        print(f"  {name}/{exporter}/dead: {row['dead']}", flush=True)
    return row


def _brief(case: dict) -> str:
    if case.get("rc") != 0:
        return f"rc={case.get('rc')} {case.get('refused') or case.get('error')}"
    bits = [f"checker={case.get('checker')}", f"ratio={case.get('params_ratio')}",
            f"params_match={case.get('params_match')}"]  # fmt: skip
    if "max_abs_diff" in case:
        bits.append(f"maxdiff={case['max_abs_diff']:.2e}")
    if "run_error" in case:
        bits.append(f"run_error={case['run_error']}")
    return " ".join(bits)


def table(rows: list[dict]) -> str:
    """The sweep as a markdown table: per row the keep-all differences, each reduction's
    parameter fraction (or what stopped it) with a `!` where a check failed, the dead-channel
    oracle's relative difference."""

    def case(c: dict) -> str:
        if c.get("rc") != 0:
            return f"refused: {c.get('refused', '')[:60]}" if c.get("rc") == 2 else "CRASH"
        ok = (c.get("checker") == "ok" and c.get("io_names_kept") and c.get("shapes_kept")
              and c.get("finite") and c.get("params_match") and "run_error" not in c)  # fmt: skip
        return f"{c.get('params_ratio')}" + ("" if ok else " !")

    lines = ["| model | exporter | keep-all max abs diff (CLI / shrink) | default | params=0.5 "
             "| flops=0.5 | dead-cut rel diff |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        if "export_error" in r or "original_run_error" in r:
            failed = r.get("export_error") or r.get("original_run_error")
            lines.append(f"| {r['model']} | {r['exporter']} | export failed: {failed[:80]} |||||")
            continue
        dead = r.get("dead", {})
        diff = dead.get("dead_cut_rel_diff")
        batch = "" if r.get("dynamic_batch") else " (static batch)"
        lines.append(
            f"| {r['model']} | {r['exporter']}{batch} | {r['keepall'].get('max_abs_diff', '-')} / "
            f"{dead.get('keepall_shrink_max_abs_diff', '-')} "
            f"| {case(r['default'])} | {case(r['params'])} | {case(r['flops'])} "
            f"| {'-' if diff is None else f'{diff:.1e}'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="timm names (default: the list above)")
    parser.add_argument("--exporters", nargs="+", default=list(EXPORTERS), choices=EXPORTERS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="ignore rows already recorded")
    parser.add_argument("--redo", nargs="+", default=[],
                        help="models to run again (with the exporters asked)")  # fmt: skip
    parser.add_argument("--table", action="store_true", help="print the recorded rows, run none")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return 0
    sizes = dict(MODELS)
    names = args.models or [n for n, _ in MODELS]
    done: dict[str, dict] = {}
    if args.out.exists() and not args.fresh:
        rows = json.loads(args.out.read_text())["rows"]
        redo = {f"{n}/{e}" for n in args.redo for e in args.exporters}
        done = {f"{r['model']}/{r['exporter']}": r for r in rows}
        done = {key: row for key, row in done.items() if key not in redo}
    wanted = [(n, e) for e in args.exporters for n in names]  # every legacy row first
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for name, exporter in wanted:
        key = f"{name}/{exporter}"
        if key in done:
            continue
        print(key, flush=True)
        start = time.time()
        done[key] = sweep_one(name, sizes.get(name, 64), exporter) | {
            "seconds": round(time.time() - start, 1)
        }
        _write(args.out, done, partial=any(f"{n}/{e}" not in done for n, e in wanted))
    _write(args.out, done, partial=any(f"{n}/{e}" not in done for n, e in wanted))
    return 0


def _write(path: Path, rows: dict[str, dict], partial: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"partial": partial, "rows": list(rows.values())}, indent=1) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())

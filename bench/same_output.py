"""Behaviour unchanged: reduce the zoo and the bundled models; the same plans and the
same written bytes as a run on another commit.

    python bench/same_output.py --out bench/results/same_output.json   # record (any commit)
    python bench/same_output.py --against REF.json                    # compare with a record

Each case exports a small zoo model (seed 0, its test input shape, deploy and train forms)
or reads a bundled one, reduces it through `onnx_mbs.reduce` (MBS, uniform and global
strategies; weight importance without data, activation importance with seeded synthetic
or the bundled Fashion-MNIST data), saves the model with `onnx_mbs.save_model` and records
the plan (counts per group, parameters and MACs before and after, notes) and the SHA-256
of the saved file. The exported input's hash is recorded too, so a change of the export
(torch) is told apart from a change of onnx-mbs. Exit 1 when any case differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

import onnx_mbs
from onnx_mbs.models import BUNDLED_DIR, FMNIST_SAMPLE
from onnx_mbs.models.zoo import ZOO

# (label, strategy, budget, with synthetic data)
ZOO_CASES = [
    ("mbs-params", "mbs", "params=0.5", False),
    ("uniform-macs", "uniform", "flops=0.6", False),
    ("global-params", "global", "params=0.5", False),
    ("mbs-act", "mbs", "params=0.5", True),
]
BUNDLED = ["resnet20_fmnist.onnx", "resnet20_fmnist_e8.onnx", "resnet56_fmnist_e7.onnx"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _outcome(model, data, folder: Path, **options) -> dict:
    """Reduce `model`, save it, and what the run planned and wrote."""
    try:
        small, report = onnx_mbs.reduce(model, data, progress=False, **options)
    except onnx_mbs.BadInputError as error:  # a refusal is behaviour too
        return {"refused": str(error)}
    path = onnx_mbs.save_model(small, folder / "out.onnx")
    files = sorted(p for p in folder.iterdir() if p.is_file())
    written = {p.name: _sha(p.read_bytes()) for p in files}
    for p in files:
        p.unlink()
    plan = report.plan
    return {
        "counts": {str(k): v for k, v in sorted(plan.counts.items())},
        "params": list(plan.params),
        "macs": list(plan.macs),
        "notes": list(plan.notes),
        "written": written,
        "model": written[path.name],
    }


def _synthetic(folder: Path, shape: tuple[int, ...]) -> str:
    """Seeded images of `shape`'s channels and size, 8 of them, as an .npz."""
    x = np.random.default_rng(0).random((8, *shape[1:]), dtype=np.float32)
    path = folder / "data.npz"
    np.savez(path, x=x)
    return str(path)


def run(names: list[str]) -> dict[str, dict]:
    from onnx_mbs.models.export import export_zoo

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        out = folder / "out"
        out.mkdir()
        for model_name in names:
            entry = ZOO[model_name]
            data = _synthetic(folder, entry.test_input_shape)
            for form in ("deploy", "train"):
                model = export_zoo(model_name, form, entry.test_input_shape)
                exported = _sha(model.SerializeToString())
                for label, strategy, budget, with_data in ZOO_CASES:
                    if with_data and form == "train":
                        continue
                    key = f"{model_name}/{form}/{label}"
                    options = {"strategy": strategy, "budget": budget}
                    if with_data:
                        options |= {"mean": 0.5, "std": 0.25, "evaluate_accuracy": False}
                    outcome = _outcome(model, data if with_data else None, out, **options)
                    results[key] = {"input": exported, **outcome}
                    print(key, outcome.get("model", outcome.get("refused")), flush=True)
        for bundled in BUNDLED:
            path = BUNDLED_DIR / bundled
            key = f"bundled/{bundled}/mbs-act"
            outcome = _outcome(str(path), str(FMNIST_SAMPLE), out, budget="params=0.5")
            input_hash = _sha(onnx.load(path).SerializeToString())
            results[key] = {"input": input_hash, **outcome}
            print(key, outcome.get("model", outcome.get("refused")), flush=True)
    return results


def compare(results: dict[str, dict], reference: dict[str, dict]) -> list[str]:
    """One line per case that differs from `reference` (or is missing on either side)."""
    problems = []
    for key in sorted(set(results) | set(reference)):
        if key not in results or key not in reference:
            problems.append(f"{key}: only in {'the reference' if key in reference else 'this run'}")
            continue
        ours, theirs = results[key], reference[key]
        if ours["input"] != theirs["input"]:
            problems.append(f"{key}: the exported input differs (torch export, not onnx-mbs)")
            continue
        for field in sorted(set(ours) | set(theirs)):
            if ours.get(field) != theirs.get(field):
                problems.append(f"{key}: {field} differs: {theirs.get(field)} -> {ours.get(field)}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    small = [n for n, e in ZOO.items() if e.small]
    parser.add_argument("--models", nargs="+", default=small, help="zoo models (default: small)")
    parser.add_argument("--out", type=Path, help="write this run's record here")
    parser.add_argument("--against", type=Path, help="a record to compare this run with")
    args = parser.parse_args(argv)
    results = run(args.models)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    if args.against is None:
        return 0
    problems = compare(results, json.loads(args.against.read_text()))
    for line in problems:
        print(line)
    print(f"{len(results)} cases, {len(problems)} differ from {args.against}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

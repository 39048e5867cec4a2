"""Which importance criterion keeps the channels that matter: the table behind
`DEFAULT_CRITERION`.

On the bundled ResNet-20 (Fashion-MNIST, BatchNorm kept), each criterion
removes the least important 25% of the channels of every residual group (the
unpinned groups with several producers, joined by an Add), with no retraining.
The score is the relative output error on 512 bundled test images:
||logits_cut - logits|| / ||logits||, and the top-1 agreement with the uncut
model. A second pair of columns does the same on the single-producer groups
(each block's inner conv). `act` measures its activations on 2048 bundled
training images, so it never sees the images it is scored on. `random` is the
mean over 16 seeds.

    python bench/importance.py
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnxruntime as ort

from onnx_mbs.data import open_data
from onnx_mbs.models import BUNDLED_MODEL, FMNIST_SAMPLE, FMNIST_TRAIN_SAMPLE
from onnx_mbs.passes import analyze_model, load_model
from onnx_mbs.passes.activations import activation_tensors
from onnx_mbs.passes.channel_groups import ChannelGroup, analyze_channels
from onnx_mbs.passes.importance import CRITERIA, DEFAULT_CRITERION, choose_channels
from onnx_mbs.passes.importance import weight_importance as build
from onnx_mbs.passes.shrink import shrink_channels
from onnx_mbs.pipeline import activation_importance
from onnx_mbs.stats import collect_stats

CPU = ["CPUExecutionProvider"]


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=CPU)
    return session.run(None, {model.graph.input[0].name: x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fraction", type=float, default=0.25, help="share of channels removed")
    args = parser.parse_args()

    raw = onnx.load(str(BUNDLED_MODEL))
    meta = {p.key: p.value for p in raw.metadata_props}
    mean, std = float(meta["onnx_mbs.mean"]), float(meta["onnx_mbs.std"])
    with np.load(FMNIST_SAMPLE) as d:
        x_test = ((d["x"].astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    with np.load(FMNIST_TRAIN_SAMPLE) as d:
        x_train = ((d["x"].astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
    name = raw.graph.input[0].name
    model = load_model(raw, {name: [len(x_test), *x_test.shape[1:]]})
    reference = _run(model, x_test)
    analysis = analyze_channels(model)
    free = [g for g in analysis.groups if not g.pinned]
    sets = {
        "residual": [g for g in free if len(g.producers) > 1],
        "single": [g for g in free if len(g.producers) == 1],
    }

    def score(keep: dict[int, list[int]]) -> tuple[float, float]:
        y = _run(shrink_channels(model, keep, analysis), x_test)
        error = float(np.linalg.norm(y - reference) / np.linalg.norm(reference))
        agree = float(np.mean(y.argmax(1) == reference.argmax(1)))
        return error, agree

    def counts(groups: list[ChannelGroup]) -> dict[int, int]:
        return {g.id: g.size - int(round(g.size * args.fraction)) for g in groups}

    calibration = load_model(raw, {name: [64, *x_test.shape[1:]]})
    batches = [{name: x_train[k : k + 64]} for k in range(0, len(x_train), 64)]
    source = open_data(batches, name, [64, *x_test.shape[1:]])
    activation = activation_tensors(calibration, analyze_model(calibration))
    stats = collect_stats(
        calibration, sorted({t for t in activation.values() if t}), source, CPU, progress=False
    )
    criteria = {key: build(model, key) for key in CRITERIA}
    criteria["act"] = activation_importance(model, stats, activation)

    rows: dict[str, dict[str, tuple[float, float]]] = {}
    for key, criterion in criteria.items():
        rows[key] = {s: score(choose_channels(g, counts(g), criterion)) for s, g in sets.items()}
    rng = np.random.default_rng(0)
    randoms: dict[str, list[tuple[float, float]]] = {s: [] for s in sets}
    for _ in range(16):
        for s, groups in sets.items():
            keep = {
                g.id: sorted(rng.choice(g.size, n, replace=False).tolist())
                for g, n in zip(groups, counts(groups).values())
            }
            randoms[s].append(score(keep))
    rows["random"] = {s: tuple(np.mean(v, axis=0)) for s, v in randoms.items()}

    n_res, n_single = len(sets["residual"]), len(sets["single"])
    print(f"bundled ResNet-20, {len(x_test)} test images, {args.fraction:.0%} of each group cut")
    print(
        f"{'criterion':<10} {'residual err':>13} {'top1 agree':>11} "
        f"{'single err':>11} {'top1 agree':>11}   ({n_res} residual, {n_single} single groups)"
    )
    for key, row in sorted(rows.items(), key=lambda kv: kv[1]["residual"][0]):
        (re, ra), (se, sa) = row["residual"], row["single"]
        print(f"{key:<10} {re:>13.4f} {ra:>11.3f} {se:>11.4f} {sa:>11.3f}")
    weight_only = {k: rows[k]["residual"][0] for k in CRITERIA}
    best = min(weight_only, key=weight_only.__getitem__)
    print(f"best weight-only criterion on residual groups: {best} (default: {DEFAULT_CRITERION})")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# reduce -> retrain -> onnxruntime static QDQ quantisation -> eval, on the bundled model
# (docs/deploy.md shows the table this prints). Needs the project's .venv (scripts/setup.sh);
# TEST: the data the four models are scored on, one column each (default: the 512 bundled
# test images; e.g. TEST="models/bundled/fmnist_sample.npz /usr/share/datasets/fashion-mnist:test").
set -euo pipefail
cd "$(dirname "$0")/.."
B=models/bundled
M=$B/resnet20_fmnist.onnx
T=$B/fmnist_train_sample.npz
TEST=${TEST:-$B/fmnist_sample.npz}
OUT=${OUT:-out/deploy}
mkdir -p "$OUT"
.venv/bin/onnx-mbs reduce $M -o "$OUT/small.onnx" --data $B/fmnist_sample.npz \
    --budget params=0.5 --no-eval
.venv/bin/onnx-mbs retrain "$OUT/small.onnx" -o "$OUT/small.ft.onnx" --data $T \
    --teacher $M --epochs 2 --lr 0.02
.venv/bin/python examples/quantise.py $M "$OUT/float.int8.onnx" --data $T
.venv/bin/python examples/quantise.py "$OUT/small.ft.onnx" "$OUT/small.ft.int8.onnx" --data $T
top1() { .venv/bin/onnx-mbs eval "$1" --data "$2" --json 2>/dev/null |
    .venv/bin/python -c "import json, sys; print(f\"{json.load(sys.stdin)['top1']:.2%}\")"; }
header="| model |"; rule="|---|"
for t in $TEST; do header="$header float, $t | int8 QDQ, $t |"; rule="$rule---:|---:|"; done
echo "$header"; echo "$rule"
for pair in "original:$M:$OUT/float.int8.onnx" \
    "reduced (params=0.5) + retrained:$OUT/small.ft.onnx:$OUT/small.ft.int8.onnx"; do
    IFS=: read -r name float int8 <<<"$pair"
    row="| $name |"
    for t in $TEST; do row="$row $(top1 "$float" "$t") | $(top1 "$int8" "$t") |"; done
    echo "$row"
done

#!/usr/bin/env bash
# The README's first command: set up (if needed), then the main job on the bundled default:
# reduce the Fashion-MNIST ResNet-20 to half its parameters (`auto`: the cost-aware MBS the
# experiment measured best there, mbs-branch), retrain it briefly
# against the original (distillation), and compare top-1 with onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
B=models/bundled
echo "== reduce: half the parameters (auto strategy) =="
.venv/bin/onnx-mbs reduce $B/resnet20_fmnist.onnx -o out/resnet20_small.onnx \
    --data $B/fmnist_sample.npz --budget params=0.5 --report out/report
echo "== retrain: 2 epochs on 2048 bundled training images, original as teacher =="
.venv/bin/onnx-mbs retrain out/resnet20_small.onnx -o out/resnet20_small.ft.onnx \
    --data $B/fmnist_train_sample.npz \
    --teacher $B/resnet20_fmnist.onnx --epochs 2 --lr 0.02
echo "== eval (onnxruntime, 512 bundled test images) =="
for m in $B/resnet20_fmnist.onnx out/resnet20_small.onnx out/resnet20_small.ft.onnx; do
    printf '%-32s ' "$(basename "$m")"
    .venv/bin/onnx-mbs eval "$m" --data $B/fmnist_sample.npz 2>/dev/null
done
echo "== deployment form: BatchNorm folded into Conv, retrained without labels =="
# onnxruntime's basic graph optimisations fold each BatchNorm into its Conv, as shipped models are.
.venv/bin/python -c "from onnx_mbs.models.deployment_form import fold_batchnorm; \
fold_batchnorm('$B/resnet20_fmnist.onnx', 'out/resnet20_folded.onnx')"
.venv/bin/onnx-mbs reduce out/resnet20_folded.onnx -o out/folded_small.onnx \
    --data $B/fmnist_sample.npz --budget params=0.5 --no-eval >/dev/null
.venv/bin/onnx-mbs retrain out/folded_small.onnx -o out/folded_small.ft.onnx \
    --data $B/fmnist_train_sample.npz --no-labels \
    --teacher out/resnet20_folded.onnx --epochs 2 --lr 0.02
for m in out/folded_small.onnx out/folded_small.ft.onnx; do
    printf '%-32s ' "$(basename "$m")"
    .venv/bin/onnx-mbs eval "$m" --data $B/fmnist_sample.npz 2>/dev/null
done
echo "agreement of out/folded_small.ft.onnx with the original (no labels needed):"
.venv/bin/onnx-mbs eval out/folded_small.ft.onnx --teacher out/resnet20_folded.onnx \
    --data $B/fmnist_sample.npz 2>/dev/null
echo "report: out/report/report.md, out/report/widths.png"

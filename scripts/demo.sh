#!/usr/bin/env bash
# The README's first command: set up (if needed), then reduce the bundled Fashion-MNIST
# ResNet-20 with MBS and compare accuracy before and after on the bundled sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
.venv/bin/onnx-mbs analyze models/bundled/resnet20_fmnist.onnx

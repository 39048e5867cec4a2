#!/usr/bin/env bash
# The GPU check (issue 15), on a machine with an NVIDIA GPU and a CUDA build of torch: installs
# onnx-mbs (and, where given, onnxruntime-gpu) into that Python, then runs bench/gpu.py, which
# writes every figure with its command to bench/results/gpu.json (or $OUT/gpu.json).
#
#   bash scripts/gpu_check.sh [--quick]
#
# ONNX_MBS_WHEEL  an onnx-mbs wheel to install (no network there: `pip wheel --no-deps .` here)
# ORT_GPU_TAR     a .tar.zst or .tar.xz of onnxruntime-gpu's installed package files, put in place
#                 of the CPU-only onnxruntime (its wheel is too large to carry in one piece)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
site=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ -n "${ORT_GPU_TAR:-}" ]; then
    rm -rf "$site"/onnxruntime "$site"/onnxruntime-*.dist-info
    case "$ORT_GPU_TAR" in
        *.zst) zstd -dcq "$ORT_GPU_TAR" | tar -x -C "$site" ;;
        *) tar -xJf "$ORT_GPU_TAR" -C "$site" ;;
    esac
fi
if [ -n "${ONNX_MBS_WHEEL:-}" ]; then
    $PY -m pip install -q --no-deps --no-index --force-reinstall "$ONNX_MBS_WHEEL"
fi
exec $PY -P bench/gpu.py --out "${OUT:-bench/results}/gpu.json" "$@"

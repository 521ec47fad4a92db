#!/usr/bin/env bash
# One GPU check, ready to run on a machine with one NVIDIA GPU and its own CUDA torch:
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: gpu-check/)
# Builds the CUDA extension, runs the CUDA tests, the ops benchmark and the runtime
# suites on random:llama-3.2-3b (bf16), and writes OUT_DIR/gpu_check.{json,md}.
# Under 9 minutes on one H100/H200. Without a GPU it reports every step as skipped and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"

#!/usr/bin/env bash
# Downloads the GPU baselines' wheels into .gpu_wheels/ (git-ignored), on a machine with network,
# so that a GPU machine without network can install them from the checkout it is given:
#   siglip-kernel 0.1.2 (pure Python + Triton; Apache-2.0): the fused SigLIP GPU package that
#   scripts/gpu_siglip.py (the first-run check's siglip stages, scripts/gpu_check) times beside
#   ours, installed there with pip install --no-index --no-deps --find-links .gpu_wheels.
#
#   bash scripts/fetch_gpu_baselines.sh [DIR]      (default: .gpu_wheels at the repository root)
#
# Carry the folder to the GPU machine with the checkout (it is ignored by git).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$ROOT/.gpu_wheels}"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
mkdir -p "$DIR"
"$PY" -m pip download --disable-pip-version-check --no-deps --only-binary=:all: --dest "$DIR" "siglip-kernel==0.1.2"
ls -l "$DIR"

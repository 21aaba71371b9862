#!/usr/bin/env bash
# Sets up (scripts/setup.sh --test: the main job's set-up plus the test extra and triton; skipped
# when up to date) and runs the test suite. The Triton kernels run on CPU tensors under Triton's
# interpreter (TRITON_INTERPRET=1); tests marked `gpu` skip without a CUDA device.
# Extra arguments go to pytest:  bash scripts/test.sh -k nt_xent
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export TRITON_INTERPRET=1
exec "${PYTHON:-python3}" -m pytest -q "$@"

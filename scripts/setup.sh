#!/usr/bin/env bash
# Sets up infonce_kernels in the current Python environment (no virtualenv is made for you):
# installs torch only when none is importable (torch==2.13.0; an existing torch, CPU or CUDA, is
# used as it is), the test/trainer dependencies, then builds the C++ (and, with a CUDA toolkit
# and a CUDA torch, CUDA) kernels in place against that torch.
#
#   bash scripts/setup.sh            # PYTHON=/path/to/python to choose the interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "infonce_kernels setup: no torch found, installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi
# Build tools first: the extension is built without isolation against the torch above.
"$PY" -m pip install -q setuptools wheel ninja
extras="test,train"
# Triton runs the GPU kernels and, under TRITON_INTERPRET=1, the CPU tests of those kernels.
# A CUDA torch brings its own pinned triton; otherwise take the registry's.
if ! "$PY" -c "import triton" >/dev/null 2>&1; then extras="$extras,triton"; fi
"$PY" -m pip install -q --no-build-isolation -e ".[${extras}]"
"$PY" -c "import infonce_kernels as ik, torch; print('infonce_kernels', ik.__version__, '| torch', torch.__version__, '| backends on cpu:', ik.available_backends('cpu'))"

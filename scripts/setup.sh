#!/usr/bin/env bash
# Sets up infonce_kernels in the current Python environment (no virtualenv is made for you):
#   1. torch==2.13.0, only when no torch is installed (an existing torch, CPU or CUDA, is kept);
#   2. the dependencies: the package's own and the `train` extra (the main job, the SimCLR trainer);
#      with --test also the `test` extra (pytest, the peer libraries) and, when missing, triton
#      (the tests run the Triton kernels on CPU under its interpreter);
#   3. the C++ (and, with a CUDA torch and the CUDA headers, CUDA) kernels, built ahead of time in
#      place against that torch: pip install --no-build-isolation -e .
# Steps 2 and 3 are skipped when a stamp in build/setup-stamps says that nothing they depend on
# changed (step 2: pyproject.toml, the extras, the interpreter, torch's version; step 3: csrc/,
# setup.py, pyproject.toml, the build spec, the interpreter, torch's version, the CUDA switches).
#
#   bash scripts/setup.sh            # main job;  PYTHON=/path/to/python picks the interpreter
#   bash scripts/setup.sh --test     # main job and the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

for_tests=0
case "${1:-}" in
  "") ;;
  --test) for_tests=1 ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
  echo "infonce_kernels setup: no torch found, installing torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi

if ! "$PY" -c "import tomllib" 2>/dev/null && ! "$PY" -c "import tomli" 2>/dev/null; then
  "$PY" -m pip install -q tomli  # reads pyproject.toml below (Python 3.10 has no tomllib)
fi
# Prints "<requirements key> <build key> <requirement> ...": sha256 keys of what each step depends
# on, then the requirements of step 2. Reads metadata only (no torch import), so it is fast.
state=$("$PY" - "$for_tests" <<'EOF'
import glob, hashlib, importlib.metadata, importlib.util, os, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

for_tests = sys.argv[1] == "1"
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = ["train"] + (["test"] if for_tests else [])
if for_tests and importlib.util.find_spec("triton") is None:
    extras.append("triton")  # a CUDA torch brings its own pinned triton
requirements = list(project["dependencies"])
for extra in extras:
    requirements += project["optional-dependencies"][extra]
# Peers whose package __init__ needs torchvision (none matches every torch): installed without
# their dependencies; the tests load their loss modules from the files (tests/peers/load.py).
no_deps = tomllib.load(open("pyproject.toml", "rb"))["tool"]["infonce_kernels"]["test-without-dependencies"]
no_deps = no_deps if for_tests else []

common = [sys.executable, importlib.metadata.version("torch")]
requirements_key = hashlib.sha256("\n".join(common + requirements + ["--no-deps"] + no_deps).encode()).hexdigest()
build = hashlib.sha256("\n".join(common + [os.environ.get(v, "") for v in ("INFONCE_NO_CUDA", "INFONCE_CUDA_ARCHS")]).encode())
files = ["setup.py", "pyproject.toml", "infonce_kernels/_build_spec.py"]
files += sorted(p for p in glob.glob("csrc/**/*", recursive=True) if os.path.isfile(p))
for path in files:
    build.update(path.encode() + b"\0" + open(path, "rb").read() + b"\0")
print(requirements_key, build.hexdigest(), *requirements)
print(*no_deps)
EOF
)
{ read -r requirements_key build_key requirements; read -r no_deps || true; } <<<"$state"

stamps=build/setup-stamps
mkdir -p "$stamps"
changed=0
if [ "$(cat "$stamps/requirements" 2>/dev/null)" != "$requirements_key" ]; then
  # shellcheck disable=SC2086  # one word per requirement
  "$PY" -m pip install -q $requirements
  if [ -n "$no_deps" ]; then
    # shellcheck disable=SC2086  # one word per requirement
    "$PY" -m pip install -q --no-deps $no_deps
  fi
  echo "$requirements_key" >"$stamps/requirements"
  changed=1
fi
if [ "$(cat "$stamps/build" 2>/dev/null)" != "$build_key" ] || ! compgen -G "infonce_kernels/_C*.so" >/dev/null; then
  # Build tools first: the extension is built without isolation against the torch above.
  "$PY" -m pip install -q "setuptools>=64" wheel ninja
  "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  echo "$build_key" >"$stamps/build"
  changed=1
fi
if [ "$changed" = 1 ]; then
  "$PY" -c "import infonce_kernels as ik, torch; print('infonce_kernels', ik.__version__, '| torch', torch.__version__, '| backends on cpu:', ik.available_backends('cpu'))"
else
  echo "infonce_kernels setup: up to date (dependencies and the C++ kernels; stamps in $stamps)"
fi

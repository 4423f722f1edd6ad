#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install sam_fused into it, compiled parts included.
# Sourced by scripts/bench.sh and scripts/test.sh; sets $PY to the environment's python.
#
# torch: an already-installed torch is kept. Otherwise SAM_FUSED_TORCH is installed, default torch==2.13.0: on the
# project's machines that is a CPU build on local disk, while an unpinned `torch` would pull a multi-GB CUDA build.
# Set SAM_FUSED_TORCH=torch (or a CUDA wheel spec) on a GPU machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAM_FUSED_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

"$PY" -c "import torch" 2>/dev/null || pip_install "${SAM_FUSED_TORCH:-torch==2.13.0}"
pip_install setuptools wheel ninja numpy pytest pytest-benchmark ruff tqdm triton scikit-learn matplotlib
# The C++ extension builds against the torch above, hence no build isolation.
MAX_JOBS="${MAX_JOBS:-2}" pip_install --no-build-isolation -e "$ROOT"
"$PY" -c "import torch, sam_fused; print('torch', torch.__version__); [print(f'  {k:7s}', v) for k, v in sam_fused.backends().items()]" \
  2> >(grep -v RuntimeWarning >&2)

#!/usr/bin/env bash
# .ci/cuda_check.sh — CI check of the CUDA C++ backend on a machine WITHOUT a GPU (docs/DESIGN.md sections 4 and 7).
#
# What it proves: the CUDA kernels (csrc/cuda) compile with nvcc for sm_80 and sm_90 (+ PTX), link against a CUDA
# build of PyTorch, load as sam_fused._C_cuda, and register a CUDA kernel for every op of sam_fused._registry.OPS;
# `import sam_fused` works there and reports the cuda backend as compiled but without a device. What it cannot prove:
# that the kernels compute the right thing — that needs a GPU (tests/test_cuda_gpu.py, and the first-use self-check).
#
# How: a separate venv outside the clone (reused when it is already right) with a CUDA build of torch; the extension
# is built from a temporary copy of the clone, so no .so compiled against that torch lands in the work tree (the
# project's own venv has a different torch and would try to load it). Idempotent, reads no stdin.
#
# Environment: SAM_FUSED_CUDA_VENV (default ~/.cache/sam_fused-cuda-venv), SAM_FUSED_CUDA_TORCH (default
# torch==2.14.1), CUDA_HOME (default: found from nvcc), MAX_JOBS (default 2), PYTHON (default python3).
# Without nvcc it prints why and exits 0, unless SAM_FUSED_REQUIRE_NVCC=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/lib.sh"
VENV="${SAM_FUSED_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sam_fused-cuda-venv}"
TORCH_SPEC="${SAM_FUSED_CUDA_TORCH:-torch==2.14.1}"
PYTHON="${PYTHON:-python3}"
START=$SECONDS
say() { echo "[cuda_check] $*"; }
elapsed() { echo "$((SECONDS - START)) s"; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sam_fused-cuda-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# --- 1. The CUDA toolkit --------------------------------------------------------------------------------------------
# nvcc on PATH may be a wrapper script or a link outside its toolkit (e.g. /usr/local/bin/nvcc exec'ing
# /usr/local/cuda-13.0/bin/nvcc), so nvcc itself is asked where its toolkit is: a dry run prints "#$ TOP=<toolkit>".
find_cuda_home() {
  local nvcc top
  local candidates=()
  [ -n "${CUDA_HOME:-}" ] && candidates+=("$CUDA_HOME/bin/nvcc")
  [ -n "${CUDA_PATH:-}" ] && candidates+=("$CUDA_PATH/bin/nvcc")
  if command -v nvcc >/dev/null 2>&1; then candidates+=("$(command -v nvcc)"); fi
  candidates+=(/usr/local/cuda/bin/nvcc /usr/local/cuda-*/bin/nvcc /opt/cuda/bin/nvcc)
  : >"$WORK/probe.cu"
  for nvcc in "${candidates[@]}"; do
    [ -x "$nvcc" ] || continue
    top="$("$nvcc" -dryrun -c "$WORK/probe.cu" -o "$WORK/probe.o" 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)" || true
    if [ -n "$top" ] && [ -f "$top/include/cuda_runtime_api.h" ]; then
      (cd "$top" && pwd -P)
      return 0
    fi
  done
  return 1
}

if ! CUDA_HOME="$(find_cuda_home)"; then
  if [ "${SAM_FUSED_REQUIRE_NVCC:-0}" = "1" ]; then
    say "FAILED: nvcc not found (looked at \$CUDA_HOME, \$CUDA_PATH, PATH, /usr/local/cuda*, /opt/cuda)"
    exit 1
  fi
  say "SKIPPED: nvcc not found (looked at \$CUDA_HOME, \$CUDA_PATH, PATH, /usr/local/cuda*, /opt/cuda);"
  say "         the CUDA extension is neither built nor checked on this machine"
  exit 0
fi
export CUDA_HOME
say "CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | sed -n 's/^Cuda compilation tools, //p'))"

# --- 2. A venv with a CUDA build of torch (reused when it already has one) ----------------------------------------
venv_ready() {
  [ -x "$VENV/bin/python" ] && TORCH_SPEC="$TORCH_SPEC" "$VENV/bin/python" - <<'EOF' 2>/dev/null
import os, sys
import ninja, numpy, setuptools, torch, wheel  # noqa: F401
want = os.environ["TORCH_SPEC"].partition("==")[2]
sys.exit(0 if torch.version.cuda and (not want or torch.__version__.split("+")[0] == want) else 1)
EOF
}
if venv_ready; then
  say "venv: reusing $VENV"
else
  say "venv: installing $TORCH_SPEC (a CUDA build), ninja, setuptools, wheel, numpy into $VENV"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" ninja setuptools wheel numpy 2>&1 |
    { grep -v "^WARNING: Location" || true; }
  venv_ready || { say "FAILED: $VENV has no CUDA build of torch ($TORCH_SPEC) after pip install"; exit 1; }
fi
say "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null) ($(elapsed))"

# --- 3. Build from a temporary copy of the clone ----------------------------------------------------------------------
SRC="$WORK/src"
copy_clone "$ROOT" "$SRC"
say "building sam_fused (setup.py build_ext) from a copy of $ROOT, MAX_JOBS=${MAX_JOBS:-2}"
if ! (cd "$SRC" && MAX_JOBS="${MAX_JOBS:-2}" SAM_FUSED_REQUIRE_EXTENSIONS=1 "$VENV/bin/python" setup.py build_ext --inplace) >"$WORK/build.log" 2>&1; then
  say "FAILED: the build failed; its errors:"
  grep -E "error:|FAILED:|RuntimeError" "$WORK/build.log" | head -n 40 || true
  echo "--- last lines of the build log ---"
  tail -n 30 "$WORK/build.log"
  if grep -q "strong_ordering\|'requires' does not name a type\|has no member named 'starts_with'" "$WORK/build.log"; then
    say "hint: torch's headers need C++20, but setup.py passes -std=c++17 to the CUDA extension"
  fi
  exit 1
fi
ls "$SRC"/sam_fused/_C_cuda*.so >/dev/null 2>&1 || {
  say "FAILED: the build did not produce sam_fused._C_cuda (is torch a CUDA build, is CUDA_HOME seen by setup.py?)"
  exit 1
}
ARCHS="$(cat "$SRC"/build/temp*/build.ninja 2>/dev/null | grep -o 'arch=compute_[0-9a-z]*,code=[a-z_0-9]*' | sort -u |
  tr '\n' ' ')"
say "built ($(elapsed)); device code: ${ARCHS:-unknown}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then  # the default of setup.py: sm_80 and sm_90 binaries plus PTX
  for want in "code=sm_80" "code=sm_90" "code=compute_90"; do
    case " $ARCHS" in *"$want"*) ;; *) say "FAILED: the build has no $want device code"; exit 1 ;; esac
  done
fi

# --- 4. Load it and check the registrations -----------------------------------------------------------------------
(cd "$WORK" && PYTHONPATH="$SRC" SAM_FUSED_SRC="$SRC" "$VENV/bin/python" - <<'EOF'
import os
import sys

import torch

import sam_fused
from sam_fused._registry import OPS


def say(msg: str) -> None:
    print(f"[cuda_check] {msg}", flush=True)


src = os.environ["SAM_FUSED_SRC"]
if not sam_fused.__file__.startswith(src):
    say(f"FAILED: imported sam_fused from {sam_fused.__file__}, not from the build copy {src}")
    sys.exit(1)
import sam_fused._C_cuda as ext  # noqa: E402  (after sam_fused, like the dispatcher does)

say(f"loaded {os.path.basename(ext.__file__)}")
missing = []
for op in OPS:
    ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_fused::{op}", "CUDA")
    say(f"  sam_fused::{op:16s} CUDA kernel {'registered' if ok else 'MISSING'}")
    if not ok:
        missing.append(op)
if missing:
    say(f"FAILED: no CUDA kernel for {missing}")
    sys.exit(1)
status = sam_fused.backends()["cuda"]
say(f"sam_fused.backends()['cuda']: {status}")
if torch.cuda.is_available():
    if not status.available:
        say("FAILED: a GPU is visible but the cuda backend is unavailable")
        sys.exit(1)
elif "compiled and registered, but no CUDA device is visible" not in status.detail:
    say("FAILED: expected the cuda backend to report 'compiled and registered, but no CUDA device is visible'")
    sys.exit(1)
# The package works in this environment: an op on CPU tensors runs (CPU kernels or the reference).
total = sam_fused.ops.grad_sumsq([torch.ones(3), torch.full((2, 2), 2.0)])
if total.tolist() != [19.0]:
    say(f"FAILED: sam_fused.ops.grad_sumsq on CPU tensors gave {total.tolist()}, expected [19.0]")
    sys.exit(1)
say("import sam_fused and a CPU op: ok")
EOF
)
say "OK: the CUDA extension compiles, links and loads with every op registered; its kernels run only on a GPU" \
  "($(elapsed))"

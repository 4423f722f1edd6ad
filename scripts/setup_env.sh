#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install sam_fused into it, compiled parts included.
# Sourced by scripts/bench.sh and scripts/test.sh; sets $PY to the environment's python.
#
# torch: an already-installed torch is kept. Otherwise SAM_FUSED_TORCH is installed, default torch==2.13.0: on the
# project's machines that is a CPU build on local disk, while an unpinned `torch` would pull a multi-GB CUDA build.
# Set SAM_FUSED_TORCH=torch (or a CUDA wheel spec) on a GPU machine.
#
# Nothing is redone that is already done: the install is skipped while a stamp in the venv matches the inputs of the
# build (csrc/, setup.py, pyproject.toml, the torch version and the build's SAM_FUSED_* / CUDA settings). Python files
# need no reinstall (an editable install). SAM_FUSED_REBUILD=1 forces the install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SAM_FUSED_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
DEPS=(setuptools wheel ninja pytest pytest-benchmark ruff tqdm triton scikit-learn matplotlib)
say() { echo "[setup] $*" >&2; }

[ -x "$VENV/bin/python" ] || { say "creating $VENV"; "$PYTHON" -m venv "$VENV"; }
PY="$VENV/bin/python"
pip_install() {  # quiet on success; the whole log on failure
  local log
  log="$(mktemp)"
  if ! "$PY" -m pip install --disable-pip-version-check "$@" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    say "FAILED: pip install $*"
    return 1
  fi
  rm -f "$log"
}
# One python start-up tells the torch version, where sam_fused imports from and its backends: each start-up costs
# seconds, and a second run of the scripts must be quick.
probe() {
  (cd / && "$PY" - 2>/dev/null <<'EOF'
import warnings

try:
    import torch
except ImportError:
    print("torch: none")
    raise SystemExit from None
print(f"torch: {torch.__version__} {torch.version.cuda}")
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sam_fused
except Exception as e:
    print(f"sam_fused: none ({type(e).__name__})")
    raise SystemExit from None
print(f"sam_fused: {sam_fused.__file__}")
for name, status in sam_fused.backends().items():
    print(f"  {name:7s} {status}")
EOF
  ) || true
}
INFO="$(probe)"
if ! grep -q '^torch: [0-9]' <<<"$INFO"; then
  say "installing ${SAM_FUSED_TORCH:-torch==2.13.0}"
  pip_install "${SAM_FUSED_TORCH:-torch==2.13.0}"
  INFO="$(probe)"
fi

stamp_of_inputs() {
  {
    printf '%s\n' "${DEPS[@]}" "$ROOT"
    sed -n 's/^torch: //p' <<<"$INFO"
    env | grep -E '^(SAM_FUSED_(CPU_CAPABILITY|NO_CUDA)|TORCH_CUDA_ARCH_LIST|CUDA_HOME|CXX)=' | sort || true
    cd "$ROOT" && find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
imports_from_root() { case "$(sed -n 's/^sam_fused: //p' <<<"$INFO")" in "$ROOT"/*) return 0 ;; *) return 1 ;; esac; }
STAMP_FILE="$VENV/.sam_fused-build-stamp"
STAMP="$(stamp_of_inputs)"

if [ "${SAM_FUSED_REBUILD:-0}" != "0" ] || ! imports_from_root || [ "$(cat "$STAMP_FILE" 2>/dev/null)" != "$STAMP" ]; then
  say "installing the tools (${DEPS[*]})"
  pip_install "${DEPS[@]}"
  say "building the C++ kernels of sam_fused (1-3 minutes on 2 cores; redone only when csrc/, setup.py or torch" \
      "change)"
  start=$SECONDS
  # The C++ extension builds against the torch above, hence no build isolation; a compile error must fail here.
  MAX_JOBS="${MAX_JOBS:-2}" SAM_FUSED_REQUIRE_EXTENSIONS=1 pip_install --no-build-isolation -e "$ROOT"
  say "built in $((SECONDS - start)) s"
  INFO="$(probe)"
  imports_from_root || { say "FAILED: after the install sam_fused does not import from $ROOT: $INFO"; exit 1; }
  echo "$STAMP" >"$STAMP_FILE"
fi
sed -e '/^sam_fused: /d' -e 's/^torch: \([^ ]*\) \(.*\)$/torch \1 (CUDA: \2)/' <<<"$INFO" >&2
if ! grep -q '^  cpu *available' <<<"$INFO"; then
  say "FAILED: the C++ CPU kernels were built but do not load (see the cpu line above)"
  exit 1
fi

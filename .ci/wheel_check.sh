#!/usr/bin/env bash
# .ci/wheel_check.sh — CI check of the package as a user installs it, not as the scripts' editable install sees it.
#
# What it proves: a wheel built with `pip wheel --no-build-isolation --no-deps .` holds the whole package (every
# subpackage imports from site-packages, the compiled CPU kernels load, the build's record is there), its extras
# install what the demo and the tests need, `python -m sam_fused.demo --quick` and `sam-fused-bench --help` run, and a
# short pytest selection passes, with Triton absent (its test modules must skip, not fail to collect).
#
# How: the wheel is built from a temporary copy of the clone (no build output lands in the work tree) with the project's
# venv ($SAM_FUSED_VENV or .venv, made by scripts/setup_env.sh: torch, setuptools, wheel, ninja); it is installed into
# a fresh venv that first gets only torch (the same version), then `sam_fused[demo,test]`; everything then runs from a
# folder outside the clone, so that nothing imports the source tree. Reads no stdin; leaves nothing behind.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/.ci/lib.sh"
BUILD_PY="${SAM_FUSED_VENV:-$ROOT/.venv}/bin/python"
PYTHON="${PYTHON:-python3}"
START=$SECONDS
say() { echo "[wheel_check] $*"; }
elapsed() { echo "$((SECONDS - START)) s"; }
quiet() {  # run a command; show its output only when it fails
  local log="$WORK/quiet.log"
  "$@" >"$log" 2>&1 || { cat "$log"; say "FAILED: $*"; exit 1; }
}

WORK="$(mktemp -d "${TMPDIR:-/tmp}/sam_fused-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
[ -x "$BUILD_PY" ] || { say "FAILED: no build venv at $BUILD_PY (run scripts/setup_env.sh first)"; exit 1; }

# --- 1. The wheel, from a copy of the clone -------------------------------------------------------------------------
SRC="$WORK/src"
copy_clone "$ROOT" "$SRC"
mkdir -p "$WORK/dist"
TORCH_VERSION="$("$BUILD_PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
say "building the wheel against torch $TORCH_VERSION (compiles the C++ kernels, 1-3 minutes)"
(cd "$SRC" && MAX_JOBS="${MAX_JOBS:-2}" SAM_FUSED_REQUIRE_EXTENSIONS=1 \
  quiet "$BUILD_PY" -m pip wheel --disable-pip-version-check --no-build-isolation --no-deps . -w "$WORK/dist")
WHEEL="$(ls "$WORK"/dist/sam_fused-*.whl)"
say "built $(basename "$WHEEL") ($(elapsed))"

# --- 2. A fresh venv: torch only, then the wheel with the extras a user picks ----------------------------------------
VENV="$WORK/venv"
"$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
quiet "$PY" -m pip install --disable-pip-version-check "torch==$TORCH_VERSION"
quiet "$PY" -m pip install --disable-pip-version-check "$WHEEL[demo,test]"
say "installed into a fresh venv: torch==$TORCH_VERSION, then $(basename "$WHEEL")[demo,test] ($(elapsed))"

# --- 3. From outside the clone: every module imports, the compiled part loads, the tools run -------------------------
RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"
"$PY" - <<'EOF'
import importlib
import pkgutil
import sys

import sam_fused

def say(msg: str) -> None:
    print(f"[wheel_check] {msg}", flush=True)

if "site-packages" not in sam_fused.__file__:
    sys.exit(f"[wheel_check] FAILED: sam_fused imported from {sam_fused.__file__}, not from the installed wheel")
failed, names = [], []
for mod in pkgutil.walk_packages(sam_fused.__path__, "sam_fused.", onerror=lambda name: None):
    if mod.name.endswith("__main__"):
        continue
    try:
        importlib.import_module(mod.name)
        names.append(mod.name)
    except ModuleNotFoundError as e:
        if e.name == "triton" and mod.name.startswith("sam_fused.kernels"):
            names.append(f"{mod.name} (needs triton: ModuleNotFoundError, as expected without the [triton] extra)")
        else:
            failed.append(f"{mod.name}: {e!r}")
    except Exception as e:
        failed.append(f"{mod.name}: {e!r}")
for name in ("sam_fused.diagnostics", "sam_fused.bench", "sam_fused.kernels"):
    if not any(n.startswith(name) for n in names):
        failed.append(f"{name}: not in the wheel")
say(f"imported {len(names)} modules: " + ", ".join(n.removeprefix("sam_fused.") for n in names))
backends = sam_fused.backends()
for name, status in backends.items():
    say(f"  {name:7s} {status}")
if not backends["cpu"].available:
    failed.append("the C++ CPU kernels of the wheel do not load")
if failed:
    sys.exit("[wheel_check] FAILED:\n  " + "\n  ".join(failed))
EOF
quiet "$VENV/bin/sam-fused-bench" --help
grep -q "^usage: sam-fused-bench" "$WORK/quiet.log" || { say "FAILED: sam-fused-bench --help"; exit 1; }
say "sam-fused-bench --help: ok"
"$PY" -m sam_fused.demo --quick --no-progress --plot "$RUN/demo.png" | sed 's/^/[wheel_check] demo: /'
[ -s "$RUN/demo.png" ] || { say "FAILED: the demo wrote no plot"; exit 1; }

# --- 4. A short test selection against the installed package ---------------------------------------------------------
mkdir -p "$RUN/suite"
cp -r "$ROOT/tests" "$ROOT/pyproject.toml" "$RUN/suite/"
say "pytest (installed wheel, no triton): test_install, test_ops, test_optim, test_triton_interpret, test_diagnostics_*"
cd "$RUN/suite"
"$PY" -m pytest -q -p no:cacheprovider tests/test_install.py tests/test_ops.py tests/test_optim.py \
  tests/test_triton_interpret.py tests/test_diagnostics_sharpness.py tests/test_diagnostics_stability.py
say "pytest (installed wheel): the parity suite's runners of the installed C++ CPU kernels"
"$PY" -m pytest -q -p no:cacheprovider tests/test_parity.py -k "cpu"
say "OK: the wheel installs, imports, runs the demo and passes the selection ($(elapsed))"

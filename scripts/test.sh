#!/usr/bin/env bash
# The test suite: set up the environment, lint, run pytest (extra arguments go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
"$PY" -m pytest -q "$@"

#!/usr/bin/env bash
# The main job: kernel microbenchmarks on the default device (extra arguments go to the benchmark CLI).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
cd "$ROOT"
"$PY" -m sam_fused.bench "$@"

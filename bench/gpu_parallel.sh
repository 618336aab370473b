#!/usr/bin/env bash
# 3D parallelism on the multi-GPU machine (2 or 4 H200 of one host), in stages so that each device
# call stays under its 10 minutes. From the repo root with $OUT set:
#   bash bench/gpu_parallel.sh STAGE [N [LAYOUT...]] [STAGE ...]     e.g.  build tests equiv 2
# Stages (N = GPUs, a power of two; default: every GPU of the machine):
#   build         configure + build build-gpu (sm_90a, Ninja, Release): tessera, tests, benches
#   tests         ctest -L mpi (MPI communicator, NCCL communicator, CPU parallel training)
#   equiv N       tiny gpt2 + llama, fp32, native attention, 5 steps: 1 GPU, then every
#                 (dp, tp, pp) of N with zero 0 and 1 (and 1f1b where pp > 1): losses must match
#   bench N [L..] recipes/llama-1b.yaml on mock data: 1 GPU and the layouts of N (or the named
#                 ones, e.g. 1gpu dp2 tp2 pp2-1f1b dp2tp2 tp2pp2-gpipe): tokens/s, scaling, MFU
#   bubble N      pp = N, m = 4 and 8: stage 0's measured idle fraction vs (p-1)/(m+p-1)
#   allreduce N   bench_allreduce (Tessera's Communicator) vs torch.distributed, busbw side by side
# Each stage prints a short table last and leaves its full logs under $OUT/<stage><N>/. Runs and
# their metrics also stay in $PAR_WORK (default /tmp/tessera-par) while the machine is warm, so
# `bench N LAYOUT...` adds layouts to an earlier bench call's table. A run that would start after
# TIME_BUDGET seconds (default 560) of this call is skipped and reported as such.
# Knobs (environment): TIME_BUDGET, EQUIV_LIMIT (120 s a run), BUILD_TARGETS, TEST_JOBS, EQUIV_FAMILIES, BENCH_STEPS (12),
# BENCH_DROP (3), BENCH_SPLIT (balanced | even), BENCH_MB (8), BENCH_M (8), BUBBLE_MB (2), BUBBLE_EVEN (1: also the even split), AR_FACTOR (4: sizes 1 MiB x 4^k),
# and for checking this script without GPUs: PAR_DEVICE=cpu, TESSERA_BIN, BENCH_RECIPE,
# BENCH_EXTRA ("--set k=v ..."), BUBBLE_SPLIT ("a,b,..").
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
WORK="${PAR_WORK:-/tmp/tessera-par}"
DEVICE="${PAR_DEVICE:-cuda}"
BUDGET="${TIME_BUDGET:-560}"
START=$(date +%s)
REPORT=(python3 bench/parallel_report.py)

gpu_count() {
  if [ "$DEVICE" = cpu ]; then echo 8; else nvidia-smi -L 2>/dev/null | grep -c '^GPU'; fi
}

# copy_out DIR DEST: logs, manifest and each run's metrics.jsonl into $OUT/DEST.
copy_out() {
  local dir=$1 dest="$OUT/$2" f
  mkdir -p "$dest"
  cp "$dir"/*.log "$dir"/runs.jsonl "$dest"/ 2>/dev/null
  for f in "$dir"/*.run/metrics.jsonl; do
    [ -f "$f" ] && cp "$f" "$dest/$(basename "$(dirname "$f")" .run).metrics.jsonl"
  done
}

# Every (dp, tp, pp) of powers of two with dp * tp * pp = N, as "dp,tp,pp" lines.
layouts_of() {
  local n=$1 tp pp
  for ((tp = 1; tp <= n; tp *= 2)); do
    for ((pp = 1; tp * pp <= n; pp *= 2)); do echo "$((n / (tp * pp))),$tp,$pp"; done
  done
}

stage_build() {
  local jobs t0
  jobs=$(nproc)
  [ "$jobs" -ge 16 ] || jobs=16
  t0=$(date +%s)
  echo "== build: build-gpu (Release, sm_90a, Ninja, -j $jobs)${BUILD_TARGETS:+, targets $BUILD_TARGETS}"
  if ! gpu_build "$jobs" "${BUILD_TARGETS:-}"; then
    echo "build: FAILED (logs: \$OUT/cmake.log, \$OUT/build.log)"
    return 1
  fi
  echo "build: ok in $(($(date +%s) - t0)) s"
  printf '%-40s %s\n' "binary" "built"
  local f
  for f in "$BIN" "$BUILD/bench/cuda/bench_allreduce" "$BUILD/tests/parallel/test_comm_nccl" \
           "$BUILD/tests/parallel/test_comm_mpi" "$BUILD/tests/e2e/test_parallel_train"; do
    printf '%-40s %s\n' "$f" "$([ -x "$f" ] && echo yes || echo NO)"
  done
}

stage_tests() {
  [ -d "$BUILD/tests" ] || { echo "missing $BUILD/tests: run the build stage first"; return 1; }
  local log="$OUT/tests-mpi.log" limit rc
  limit=$(($(left) - 15))
  [ "$limit" -ge 30 ] || { echo "tests: not run, only $(left) s of the time budget left"; return 1; }
  echo "== tests: ctest -L mpi -j ${TEST_JOBS:-4} (at most $limit s; log: \$OUT/tests-mpi.log)"
  # CPU parallel-training tests start up to 8 ranks each: two OpenMP threads per rank is plenty.
  OMP_NUM_THREADS=2 timeout -k 10 "$limit" ctest --test-dir "$BUILD" -L mpi -j "${TEST_JOBS:-4}" \
    --timeout 300 --output-on-failure < /dev/null > "$log" 2>&1
  rc=$?
  [ "$rc" -eq 124 ] && echo "tests: ctest was stopped at the time budget; the table is partial"
  "${REPORT[@]}" tests "$log" || rc=1
  return "$rc"
}

# ---- equiv: parallel equals serial on the GPU --------------------------------------------------

# The tiny models of tests/e2e/parallel_train_test.cpp (8 layers, 8 heads, vocabulary
# 250 padded to 256, 16 sequences of 16 tokens per step as 2 micro-batches per dp rank), but 64
# wide (head dim 8: the native attention kernel needs a multiple of 8), in fp32 with the
# deterministic native attention, no checkpoints.

EQUIV_ARGS=(recipes/ci-tiny.yaml --set data.path=mock --set model.vocab_size=250
  --set model.vocab_pad_multiple=64 --set model.num_layers=8 --set model.hidden=64
  --set model.num_heads=8 --set model.max_seq_len=16 --set data.seq_len=16
  --set data.global_batch=16 --set data.micro_batch=0 --set data.grad_accum=1
  --set parallel.microbatches=2 --set train.steps=5 --set train.eval_every=0
  --set train.eval_batches=2 --set train.sample_tokens=0 --set optim.warmup_steps=2
  --set optim.lr=3e-3 --set checkpoint.every=0 --set checkpoint.save_final=false
  --set logging.every=5 --set precision.compute=fp32 --set train.attention=native)
LLAMA_ARGS=(--set model.family=llama --set model.num_kv_heads=4 --set model.qk_norm=true
  --set model.ffn_hidden=64)

equiv_run() {  # DIR FAMILY DP TP PP ZERO SCHEDULE
  local dir=$1 fam=$2 dp=$3 tp=$4 pp=$5 zero=$6 sched=$7 name np
  np=$((dp * tp * pp))
  name="${fam}_dp${dp}_tp${tp}_pp${pp}_zero${zero}_${sched}"
  [ "$np" -eq 1 ] && name="${fam}_serial"
  local fields="\"family\": \"$fam\", \"np\": $np, \"dp\": $dp, \"tp\": $tp, \"pp\": $pp, \"zero\": $zero, \"schedule\": \"$sched\""
  if [ "$(left)" -lt 20 ]; then
    record "$dir" "$name" skipped "$fields"
    echo "  $name: skipped (time budget)"
    return
  fi
  local fam_args=() limit=$(($(left) - 5))
  [ "$fam" = llama ] && fam_args=("${LLAMA_ARGS[@]}")
  [ "$limit" -le "${EQUIV_LIMIT:-120}" ] || limit=${EQUIV_LIMIT:-120}
  run_tessera "$dir" "$name" "$np" "$limit" "${EQUIV_ARGS[@]}" "${fam_args[@]}" \
    --set train.device="$DEVICE" --set parallel.dp="$dp" --set parallel.tp="$tp" \
    --set parallel.pp="$pp" --set parallel.zero="$zero" --set parallel.schedule="$sched"
  record "$dir" "$name" "$run_rc" "$fields"
  echo "  $name: rc $run_rc ($run_secs s)"
}

stage_equiv() {
  local n=$1 dir="$WORK/equiv$1" fam layout dp tp pp zero
  need "$BIN" || return 1
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "== equiv $n: tiny gpt2/llama fp32 on $DEVICE, 1 GPU vs every layout of $n (logs: \$OUT/equiv$n/)"
  for fam in ${EQUIV_FAMILIES:-gpt2 llama}; do
    equiv_run "$dir" "$fam" 1 1 1 0 gpipe
    for layout in $(layouts_of "$n"); do
      IFS=, read -r dp tp pp <<< "$layout"
      for zero in 0 1; do equiv_run "$dir" "$fam" "$dp" "$tp" "$pp" "$zero" gpipe; done
      if [ "$pp" -gt 1 ]; then equiv_run "$dir" "$fam" "$dp" "$tp" "$pp" 0 1f1b; fi
    done
  done
  copy_out "$dir" "equiv$n"
  "${REPORT[@]}" equiv "$dir" --json "$OUT/equiv$n/summary.json"
}

# ---- bench: llama-1b throughput per layout -----------------------------------------------------

BENCH_RECIPE="${BENCH_RECIPE:-recipes/llama-1b.yaml}"
BENCH_STEPS="${BENCH_STEPS:-12}"
BENCH_DROP="${BENCH_DROP:-3}"
BENCH_MB="${BENCH_MB:-8}"   # the 1-GPU run's micro-batch (the recipe's)
BENCH_M="${BENCH_M:-8}"     # micro-batches per pipeline flush

# As bench/train_throughput.sh: random tokens, no periodic evaluation, no checkpoints.
# shellcheck disable=SC2206  # BENCH_EXTRA is split into words on purpose
THROUGHPUT_ARGS=(--set data.path=mock --set optim.warmup_steps=1 --set train.eval_every=0
  --set train.eval_batches=1 --set checkpoint.every=0 --set checkpoint.save_final=false
  --set logging.every=4 --set data.grad_accum=1 ${BENCH_EXTRA:-})

# parse_layout NAME: "1gpu" or dp<a>tp<b>pp<c>[-gpipe|-1f1b] (axes of size 1 may be left out)
# -> sets L_DP L_TP L_PP L_SCHED L_NAME (canonical); returns 1 for anything else.
parse_layout() {
  L_DP=1 L_TP=1 L_PP=1 L_SCHED=gpipe
  if [ "$1" != 1gpu ]; then
    [[ "$1" =~ ^(dp([0-9]+))?(tp([0-9]+))?(pp([0-9]+))?(-(gpipe|1f1b))?$ ]] || return 1
    L_DP=${BASH_REMATCH[2]:-1} L_TP=${BASH_REMATCH[4]:-1} L_PP=${BASH_REMATCH[6]:-1}
    L_SCHED=${BASH_REMATCH[8]:-gpipe}
  fi
  L_NAME=""
  [ "$L_DP" -gt 1 ] && L_NAME+="dp$L_DP"
  [ "$L_TP" -gt 1 ] && L_NAME+="tp$L_TP"
  [ "$L_PP" -gt 1 ] && L_NAME+="pp$L_PP-$L_SCHED"
  [ -n "$L_NAME" ] || L_NAME=1gpu
}

bench_run() {  # DIR LAYOUT
  local dir=$1
  parse_layout "$2" || { echo "bench: '$2' is not a layout (1gpu, dp2, tp2pp2-1f1b, ...)"; return 1; }
  local name=$L_NAME dp=$L_DP tp=$L_TP pp=$L_PP sched=$L_SCHED np m mb global
  np=$((dp * tp * pp))
  if [ "$np" -gt "$(gpu_count)" ]; then
    echo "bench: $name needs $np GPUs, this machine has $(gpu_count)"
    return 1
  fi
  # Global batch = the 1-GPU run's x dp; pp splits a replica's sequences into m micro-batches.
  global=$((BENCH_MB * dp)) m=1 mb=$BENCH_MB
  local batch_args=(--set data.micro_batch="$mb" --set parallel.microbatches=1)
  if [ "$pp" -gt 1 ]; then
    m=$BENCH_M mb=$((BENCH_MB / BENCH_M))
    [ $((mb * m)) -eq "$BENCH_MB" ] || { echo "bench: BENCH_M $m must divide BENCH_MB $BENCH_MB"; return 1; }
    batch_args=(--set data.global_batch="$global" --set data.micro_batch=0
                --set parallel.microbatches="$m" --set parallel.schedule="$sched")
    # Stages balanced for the LM head, as a user would set them (BENCH_SPLIT=even: the default).
    local layers
    [ "${BENCH_SPLIT:-balanced}" = balanced ] && layers=$(balanced_split "$pp")
    [ -n "${layers:-}" ] && batch_args+=(--set "parallel.stage_layers=[$layers]")
  fi
  local fields="\"np\": $np, \"dp\": $dp, \"tp\": $tp, \"pp\": $pp, \"schedule\": \"$sched\", \"microbatches\": $m, \"micro_batch\": $mb, \"global_batch\": $global"
  if [ "$(left)" -lt 90 ]; then
    record "$dir" "$name" skipped "$fields"
    echo "  $name: skipped (time budget): rerun with bench N $name"
    return
  fi
  local limit=$(($(left) - 10))
  [ "$limit" -le 300 ] || limit=300
  run_tessera "$dir" "$name" "$np" "$limit" "$BENCH_RECIPE" "${THROUGHPUT_ARGS[@]}" \
    --set train.device="$DEVICE" --set train.steps="$BENCH_STEPS" --set parallel.dp="$dp" \
    --set parallel.tp="$tp" --set parallel.pp="$pp" "${batch_args[@]}"
  record "$dir" "$name" "$run_rc" "$fields"
  echo "  $name: rc $run_rc ($run_secs s)"
}

stage_bench() {
  local n=$1
  shift
  local dir="$WORK/bench$n" names=("$@") l
  need "$BIN" || return 1
  if [ ${#names[@]} -eq 0 ]; then
    case "$n" in
      2) names=(1gpu dp2 tp2 pp2-gpipe pp2-1f1b) ;;
      4) names=(1gpu dp4 tp4 pp4-gpipe dp2tp2 tp2pp2-gpipe dp2pp2-gpipe) ;;
      *) echo "bench: no default layouts for $n GPUs: name them (bench $n 1gpu dp$n ...)"; return 1 ;;
    esac
    rm -rf "$dir"  # a full sweep starts afresh; named layouts add to (or redo in) the last one
  fi
  mkdir -p "$dir"
  echo "== bench $n: $BENCH_RECIPE, $BENCH_STEPS steps (first $BENCH_DROP dropped): ${names[*]}"
  for l in "${names[@]}"; do bench_run "$dir" "$l"; done
  copy_out "$dir" "bench$n"
  "${REPORT[@]}" bench "$dir" --drop "$BENCH_DROP" --recipe "$BENCH_RECIPE" --mb "$BENCH_MB" \
    --json "$OUT/parallel_bench.json"
}

# ---- bubble: pipeline idle fraction -----------------------------------------------------------

BUBBLE_MB="${BUBBLE_MB:-2}"

# Blocks per stage that balance llama-1b's stages: its tied LM head (+ cross-entropy) costs about
# 3.8 blocks (262M of ~69M-per-block-equivalent FLOPs), so the last stage gets that many fewer.
balanced_split() {
  if [ -n "${BUBBLE_SPLIT:-}" ]; then echo "$BUBBLE_SPLIT"; return; fi
  case "$1" in
    2) echo "10,6" ;;
    4) echo "5,5,5,1" ;;
    *) echo "" ;;
  esac
}

bubble_run() {  # DIR P M SPLIT(even|balanced) STAGE_LAYERS
  local dir=$1 p=$2 m=$3 split=$4 layers=$5 name
  name="pp${p}_m${m}_${split}"
  local fields="\"np\": $p, \"pp\": $p, \"microbatches\": $m, \"micro_batch\": $BUBBLE_MB, \"schedule\": \"gpipe\", \"split\": \"$split\", \"stage_layers\": \"$layers\""
  if [ "$(left)" -lt 90 ]; then
    record "$dir" "$name" skipped "$fields"
    echo "  $name: skipped (time budget)"
    return
  fi
  local split_args=()
  [ -n "$layers" ] && split_args=(--set "parallel.stage_layers=[$layers]")
  local limit=$(($(left) - 10))
  [ "$limit" -le 300 ] || limit=300
  run_tessera "$dir" "$name" "$p" "$limit" "$BENCH_RECIPE" "${THROUGHPUT_ARGS[@]}" \
    --set train.device="$DEVICE" --set train.steps=10 --set parallel.pp="$p" \
    --set parallel.microbatches="$m" --set parallel.schedule=gpipe \
    --set data.micro_batch="$BUBBLE_MB" --set logging.profile_ops=true "${split_args[@]}"
  record "$dir" "$name" "$run_rc" "$fields"
  echo "  $name: rc $run_rc ($run_secs s)"
}

stage_bubble() {
  local n=$1 dir="$WORK/bubble$1" split m
  need "$BIN" || return 1
  rm -rf "$dir"
  mkdir -p "$dir"
  split=$(balanced_split "$n")
  echo "== bubble $n: $BENCH_RECIPE, pp $n, gpipe, micro-batch $BUBBLE_MB, profile_ops on, 10 steps (first 3 dropped)"
  for m in 4 8; do
    if [ -n "$split" ]; then bubble_run "$dir" "$n" "$m" balanced "$split"; else bubble_run "$dir" "$n" "$m" even ""; fi
  done
  # The default even split at m = 8: how much the LM head's stage adds to the idle time.
  [ -n "$split" ] && [ "${BUBBLE_EVEN:-1}" = 1 ] && bubble_run "$dir" "$n" 8 even ""
  copy_out "$dir" "bubble$n"
  "${REPORT[@]}" bubble "$dir" --drop 3 --recipe "$BENCH_RECIPE" --json "$OUT/bubble$n/summary.json"
}

# ---- allreduce: Communicator vs torch.distributed ----------------------------------------------

stage_allreduce() {
  local n=$1 dir="$OUT/allreduce$1" ar="$BUILD/bench/cuda/bench_allreduce" rc=0 limit
  need "$ar" || return 1
  mkdir -p "$dir"
  local sweep=(--factor "${AR_FACTOR:-4}")
  echo "== allreduce $n: bench_allreduce (mpirun) and bench/torch/bench_allreduce.py (torchrun)"
  [ "$(left)" -ge 60 ] || { echo "allreduce: not run, only $(left) s of the time budget left"; return 1; }
  limit=$(($(left) / 2))
  [ "$limit" -le 240 ] || limit=240
  timeout -k 10 "$limit" "${MPI_ENV[@]}" "${MPIRUN[@]}" -np "$n" "$ar" "${sweep[@]}" \
    --json "$dir/tessera.jsonl" < /dev/null > "$dir/tessera.log" 2>&1 || { rc=1; tail -5 "$dir/tessera.log"; }
  limit=$(($(left) - 10))
  [ "$limit" -le 240 ] || limit=240
  timeout -k 10 "$limit" python3 -m torch.distributed.run --standalone --nproc_per_node "$n" \
    bench/torch/bench_allreduce.py "${sweep[@]}" --json "$dir/torch.jsonl" < /dev/null > "$dir/torch.log" 2>&1 \
    || { rc=1; tail -5 "$dir/torch.log"; }
  "${REPORT[@]}" allreduce "$dir/tessera.jsonl" "$dir/torch.jsonl" --json "$dir/summary.json" || rc=1
  return "$rc"
}

# ---- driver -----------------------------------------------------------------------------------

usage() { sed -n '2,21p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

is_stage() { case "$1" in build|tests|equiv|bench|bubble|allreduce) return 0 ;; esac; return 1; }

[ $# -gt 0 ] || { usage; exit 2; }
status=0
while [ $# -gt 0 ]; do
  stage=$1
  shift
  case "$stage" in
    -h|--help) usage; exit 0 ;;
    build) stage_build || exit 1 ;;  # nothing after it can run on a failed build
    tests) stage_tests || status=1 ;;
    equiv|bench|bubble|allreduce)
      n=$(gpu_count)
      if [[ "${1:-}" =~ ^[0-9]+$ ]]; then n=$1; shift; fi
      if [ "$n" -lt 2 ] || [ $((n & (n - 1))) -ne 0 ] || [ "$n" -gt "$(gpu_count)" ]; then
        echo "$stage: N = $n must be a power of two >= 2 and at most the $(gpu_count) GPUs here"
        status=1
        continue
      fi
      layouts=()
      if [ "$stage" = bench ]; then
        while [ $# -gt 0 ] && ! is_stage "$1"; do layouts+=("$1"); shift; done
      fi
      "stage_$stage" "$n" "${layouts[@]}" || status=1
      ;;
    *) echo "gpu_parallel.sh: unknown stage '$stage'"; usage; exit 2 ;;
  esac
done
exit $status

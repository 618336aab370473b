#!/usr/bin/env bash
# launch/slurm.sbatch against a real Slurm: starts a private single-node cluster on this machine
# (scripts/slurm-local.sh: munged, slurmctld, slurmd as the current user), submits the template
# with 4 tasks running recipes/ci-tiny.yaml at dp 2 x pp 2 on the CPU for a few steps, and checks
#   - its per-step losses equal, bit for bit (the text of metrics.jsonl), those of the same run
#     started by launch/mpirun.sh -n 4;
#   - srun wired MPI through PMIx and started 4 ranks of one world;
#   - each rank ran OMP_NUM_THREADS = --cpus-per-task OpenMP threads, bound to CPUs of its own:
#     every rank logs its placement ("placement: rank 0 host .. cpus 0 (1) omp 1; ..."). With
#     fewer CPUs than 4 tasks (CI has 2 cores) the job overcommits and Slurm binds every task to
#     all the job's CPUs (OMP_NUM_THREADS=1 still, where OpenMP would default to 2), so a second
#     job of 2 tasks x 1 CPU (2 CPUs on a node of 4 or more) checks per-task binding.
# The template runs as a user edits it for a CPU node: its --ntasks-per-node and --gpus-per-node
# lines deleted (Slurm refuses more tasks per node than the node's CPUs even with --overcommit,
# and this node has no GPUs); the rest of the file runs unchanged.
# Usage: slurm_test.sh REPO_ROOT BUILD_DIR. Exit status 0 when every check passed, 77 (skipped)
# when the cluster cannot start here (scripts/slurm-local.sh says why).
set -uo pipefail
root="$(cd "${1:?usage: slurm_test.sh REPO_ROOT BUILD_DIR}" && pwd)"
build="$(cd "${2:?usage: slurm_test.sh REPO_ROOT BUILD_DIR}" && pwd)"

# Outside the cluster: start one around this script (77 from it means skipped).
if [ -z "${SLURM_LOCAL_DIR:-}" ]; then
  exec bash "$root/scripts/slurm-local.sh" bash "${BASH_SOURCE[0]}" "$root" "$build"
fi

bin="$build/src/cli/tessera"
[ -x "$bin" ] || { echo "FAIL: no tessera binary at $bin"; exit 1; }
[ -f "$root/data/gutenberg/gutenberg.h5" ] ||
  { echo "FAIL: no CI corpus (data/gutenberg/gutenberg.h5): run scripts/prepare-data.sh"; exit 1; }
scratch="$(mktemp -d "${TMPDIR:-/tmp}/slurm-test.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
chmod 755 "$scratch"
cd "$root" || exit 1
num_failed=0

check() {  # check NAME COMMAND... : the command must succeed
  local name="$1"; shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; num_failed=$((num_failed + 1)); fi
}
contains() { grep -qF -- "$2" <<<"$1" || { echo "  missing: $2"; echo "  in: $1"; return 1; }; }

# ci-tiny, small: 6 steps of 2 micro-batches of 4 sequences per dp rank, one evaluation batch at
# the end, no samples; a metrics line every step.
train_args=(recipes/ci-tiny.yaml --set parallel.dp=2 --set parallel.pp=2
  --set parallel.microbatches=2 --set data.micro_batch=4 --set train.steps=6 --set optim.warmup_steps=2
  --set train.eval_every=0 --set train.eval_batches=1 --set train.sample_tokens=0
  --set logging.every=1)

# Ranks poll for messages: with more ranks than cores they must yield, which Open MPI does by
# itself only under its own mpirun --oversubscribe. Containers lack the ptrace rights of CMA.
export OMPI_MCA_mpi_yield_when_idle=1 OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMP_WAIT_POLICY=PASSIVE

# The template as edited for this node (see the header).
job="$scratch/slurm.sbatch"
grep -vE '^#SBATCH --(ntasks-per-node|gpus-per-node)=' launch/slurm.sbatch >"$job"
check "template: two #SBATCH lines edited out" \
  test "$(($(wc -l <launch/slurm.sbatch) - $(wc -l <"$job")))" -eq 2

cpus="$(sinfo -h -N -n localhost -o %c)"
echo "node: $cpus CPUs"

# submit NAME SBATCH_OPTION... -- TRAIN_ARG... : sbatch from the repository root, then waits for
# the job (polling: sbatch --wait checks ever more seldom, up to 10 s late); prints the job's
# output; fails when the job did not complete or took over 240 s.
submit() {
  local name="$1"; shift
  local opts=()
  while [ "$1" != -- ]; do opts+=("$1"); shift; done
  shift
  local id state=""
  id="$(TESSERA_BIN="$bin" sbatch --parsable --job-name="$name" --output="$scratch/$name.out" \
    "${opts[@]}" "$job" "$@")" || return 1
  local deadline=$((SECONDS + 240))
  while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(scontrol -o show job "$id" | grep -o 'JobState=[A-Z_]*')"
    state="${state#JobState=}"
    case "$state" in
      PENDING | CONFIGURING | RUNNING | COMPLETING | "") sleep 0.2 ;;
      *) break ;;
    esac
  done
  cat "$scratch/$name.out" 2>/dev/null
  echo "job $id ($name): ${state:-unknown}"
  [ "$state" = COMPLETED ] || { scancel "$id" 2>/dev/null; return 1; }
}

# losses DIR: "step loss" lines from DIR/metrics.jsonl, the loss as written (round-trip digits).
losses() {
  grep '"loss":' "$1/metrics.jsonl" 2>/dev/null |
    sed -E 's/.*"loss":([^,}]*).*"step":([0-9]+).*/\2 \1/; t; s/.*"step":([0-9]+).*"loss":([^,}]*).*/\1 \2/'
}

# placement OUTPUT: one "rank R cpus LIST (N) omp T" line per rank, from rank 0's placement line.
placement() {
  grep -m1 -o 'placement: .*' <<<"$1" | sed 's/^placement: //' | tr ';' '\n' |
    sed -E 's/^ *rank ([0-9]+) host [^ ]+ cpus ([^ ]+) \(([0-9]+)\) omp ([0-9]+)$/\1 \2 \3 \4/'
}

# check_placement OUTPUT RANKS CPUS_PER_TASK OWN_CPUS: every rank ran CPUS_PER_TASK OpenMP
# threads; with OWN_CPUS=1, bound to exactly that many CPUs, no two ranks sharing one.
check_placement() {
  local out="$1" ranks="$2" cpt="$3" own="$4"
  local lines
  lines="$(placement "$out")"
  [ "$(grep -cE '^[0-9]+ [0-9,-]+ [0-9]+ [0-9]+$' <<<"$lines")" -eq "$ranks" ] ||
    { echo "  want $ranks ranks in the placement line: $lines"; return 1; }
  local r list n omp seen=""
  while read -r r list n omp; do
    [ "$omp" -eq "$cpt" ] || { echo "  rank $r: $omp OpenMP threads, want $cpt"; return 1; }
    [ "$own" -eq 1 ] || continue
    [ "$n" -eq "$cpt" ] || { echo "  rank $r bound to $n CPUs ($list), want $cpt"; return 1; }
    seen+="$(expand_cpus "$list") "
  done <<<"$lines"
  [ "$own" -eq 1 ] || return 0
  local dup
  dup="$(tr ' ' '\n' <<<"$seen" | grep -v '^$' | sort | uniq -d)"
  [ -z "$dup" ] || { echo "  CPUs bound to two ranks: $dup ($lines)"; return 1; }
}
expand_cpus() {  # "0-2,5" -> "0 1 2 5"
  local part parts c
  IFS=, read -r -a parts <<<"$1"
  for part in "${parts[@]}"; do
    for ((c = ${part%-*}; c <= ${part#*-}; ++c)); do printf '%s ' "$c"; done
  done
}

# 1. The 4-task run: dp 2 x pp 2, 1 CPU per task; --overcommit where the node has fewer CPUs.
overcommit=()
own=1
if [ "$cpus" -lt 4 ]; then overcommit=(--overcommit); own=0; fi
start=$SECONDS
out="$(submit tessera-dp2pp2 --nodes=1 --ntasks=4 --cpus-per-task=1 "${overcommit[@]}" -- \
  "${train_args[@]}" --set train.out_dir="$scratch/slurm-run" 2>&1)"
status=$?
echo "$out" | tail -n 40
echo "slurm job: ${status} in $((SECONDS - start)) s"
check "slurm: the 4-task job succeeded" test "$status" -eq 0
check "slurm: srun with PMIx, cpus per task, core binding" contains "$out" \
  "+ OMP_NUM_THREADS=1 srun --mpi=pmix --kill-on-bad-exit=1 --cpus-per-task=1 --cpu-bind=cores $bin train recipes/ci-tiny.yaml"
check "slurm: one world of 4 ranks, dp 2 x pp 2" contains "$out" "world 4 = dp 2 x tp 1 x pp 2"
check "slurm: 4 ranks, OMP_NUM_THREADS = cpus-per-task (1)" check_placement "$out" 4 1 "$own"

# 2. The same run under mpirun (launch/mpirun.sh), outside Slurm.
start=$SECONDS
ref_out="$(OMP_NUM_THREADS=1 TESSERA_BIN="$bin" \
  TESSERA_MPIRUN_ARGS="--oversubscribe --allow-run-as-root --bind-to none" \
  timeout 240 bash launch/mpirun.sh -n 4 "${train_args[@]}" --set train.out_dir="$scratch/mpirun-run" 2>&1)"
status=$?
echo "mpirun run: ${status} in $((SECONDS - start)) s"
check "mpirun: the 4-rank run succeeded" test "$status" -eq 0 || echo "$ref_out" | tail -n 30
slurm_losses="$(losses "$scratch/slurm-run")"
mpirun_losses="$(losses "$scratch/mpirun-run")"
echo "losses (step, slurm, mpirun):"
paste -d' ' <(echo "$slurm_losses") <(cut -d' ' -f2 <<<"$mpirun_losses")
check "losses: 6 steps logged" test "$(grep -c . <<<"$slurm_losses")" -eq 6
check "losses: slurm == mpirun, bit for bit" test "$slurm_losses" = "$mpirun_losses"

# 3. Per-task binding: 2 tasks of 2 CPUs each where the node has 4 CPUs, else of 1 (CI).
if [ "$cpus" -ge 2 ]; then
  cpt=$((cpus >= 4 ? 2 : 1))
  out="$(submit tessera-bind --nodes=1 --ntasks=2 --cpus-per-task="$cpt" -- recipes/ci-tiny.yaml \
    --set parallel.dp=2 --set data.micro_batch=2 --set train.steps=1 --set optim.warmup_steps=1 \
    --set train.eval_batches=1 --set train.sample_tokens=0 --set train.out_dir="$scratch/bind-run" 2>&1)"
  status=$?
  check "slurm: the 2-task job succeeded" test "$status" -eq 0 || echo "$out" | tail -n 30
  check "slurm: 2 ranks, each bound to its own $cpt CPUs, OMP_NUM_THREADS=$cpt" \
    check_placement "$out" 2 "$cpt" 1
  grep -m1 -o 'placement: .*' <<<"$out"
fi

echo "$num_failed failed"
[ "$num_failed" -eq 0 ]

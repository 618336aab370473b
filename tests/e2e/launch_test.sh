#!/usr/bin/env bash
# Tests launch/mpirun.sh (through the real mpirun, 3 ranks, with a stand-in for the tessera binary
# that records its rank, environment and arguments) and launch/slurm.sbatch (with a stand-in srun
# on PATH). Usage: launch_test.sh REPO_ROOT. Exit status 0 only when every check passed.
set -uo pipefail
root="${1:?usage: launch_test.sh REPO_ROOT}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
num_failed=0

check() {  # check NAME COMMAND... : the command must succeed
  local name="$1"; shift
  if "$@"; then echo "ok   $name"; else echo "FAIL $name"; num_failed=$((num_failed + 1)); fi
}
contains() { grep -qF -- "$2" <<<"$1" || { echo "  missing: $2"; echo "  in: $1"; return 1; }; }
count_is() { [ "$(grep -cF -- "$2" <<<"$1")" -eq "$3" ] || { echo "  want $3 x '$2' in: $1"; return 1; }; }

# The stand-in binary: one line per rank, each argument bracketed so boundaries show. Each rank
# writes its own file, since lines printed to mpirun's forwarded stdout can interleave mid-line.
mkdir -p "$tmp/ranks"
cat >"$tmp/tessera" <<'EOF'
#!/usr/bin/env bash
{
  printf 'rank=%s local=%s nvls=%s data=%s args=' "${OMPI_COMM_WORLD_RANK:-}" \
    "${OMPI_COMM_WORLD_LOCAL_RANK:-}" "${NCCL_NVLS_ENABLE:-unset}" "${TESSERA_DATA_DIR:-unset}"
  printf '[%s]' "$@"
  printf '\n'
} >"$(dirname "$0")/ranks/${OMPI_COMM_WORLD_RANK:-none}"
EOF
chmod +x "$tmp/tessera"

# Open MPI as root and more ranks than cores: test-only settings, passed to this script's mpirun.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# mpi COMMAND...: runs it with the stand-in; prints the launcher output, then each rank's line.
mpi() {
  rm -f "$tmp/ranks/"*
  env -u NCCL_NVLS_ENABLE TESSERA_BIN="$tmp/tessera" TESSERA_MPIRUN_ARGS="--oversubscribe" \
    "$@" 2>&1
  local status=$?
  cat "$tmp/ranks/"* 2>/dev/null
  return $status
}

out="$(mpi timeout 120 bash "$root/launch/mpirun.sh" -n 3 r.yaml --set "train.sample_prompt=a b")"
check "mpirun.sh: 3 ranks" count_is "$out" "args=[train][r.yaml][--set][train.sample_prompt=a b]" 3
check "mpirun.sh: ranks 0..2" contains "$out" "rank=2 local=2"
check "mpirun.sh: NCCL_NVLS_ENABLE left unset" count_is "$out" "nvls=unset " 3
check "mpirun.sh: prints the command" contains "$out" "+ mpirun -np 3 --oversubscribe $tmp/tessera train r.yaml --set train.sample_prompt=a\\ b"

out="$(mpi NCCL_NVLS_ENABLE=1 TESSERA_DATA_DIR=/d timeout 120 bash "$root/launch/mpirun.sh" --np=2 -- r.yaml)"
check "mpirun.sh: keeps a given NCCL_NVLS_ENABLE" count_is "$out" "nvls=1 data=/d args=[train][r.yaml]" 2
check "mpirun.sh: forwards NCCL_NVLS_ENABLE by name" contains "$out" "-x NCCL_NVLS_ENABLE"
check "mpirun.sh: forwards TESSERA_DATA_DIR by name" contains "$out" "-x TESSERA_DATA_DIR"

# A TERM for the launcher reaches the ranks as USR1 (mpirun kills its ranks on its own TERM):
# a stand-in that records the USR1 and exits 0 must leave the launcher exiting 0 (the stand-in
# gives up after a minute, so no timeout wrapper, which would take the TERM itself).
cat >"$tmp/tessera-usr1" <<'EOF'
#!/usr/bin/env bash
trap 'echo usr1 >"$(dirname "$0")/ranks/${OMPI_COMM_WORLD_RANK}"; exit 0' USR1
echo started >"$(dirname "$0")/ranks/${OMPI_COMM_WORLD_RANK}"
for _ in $(seq 600); do sleep 0.1; done
exit 3
EOF
chmod +x "$tmp/tessera-usr1"
term_launcher() {
  rm -f "$tmp/ranks/"*
  env -u NCCL_NVLS_ENABLE TESSERA_BIN="$tmp/tessera-usr1" TESSERA_MPIRUN_ARGS="--oversubscribe" \
    bash "$root/launch/mpirun.sh" -n 2 r.yaml >/dev/null 2>&1 &
  local pid=$! i
  for i in $(seq 600); do  # until both ranks run (and trap USR1)
    [ "$(cat "$tmp/ranks/"* 2>/dev/null | grep -c started)" -eq 2 ] && break
    sleep 0.1
  done
  kill -TERM "$pid"
  wait "$pid" || { echo "  launcher exited $?"; return 1; }
  [ "$(cat "$tmp/ranks/"* | grep -c usr1)" -eq 2 ] || { echo "  ranks: $(cat "$tmp/ranks/"*)"; return 1; }
}
check "mpirun.sh: TERM becomes USR1 for every rank, exit 0" term_launcher

hosts="$tmp/hosts"
echo "localhost slots=4" >"$hosts"
out="$(mpi bash "$root/launch/mpirun.sh" -n 8 --hostfile "$hosts" --per-node 4 --dry-run r.yaml)"
check "mpirun.sh: hostfile and per-node" contains "$out" "-np 8 --hostfile $hosts --map-by ppr:4:node"
check "mpirun.sh: dry run starts nothing" bash -c "! grep -q rank= <<<\"\$1\"" _ "$out"

expect_status() {  # expect_status WANT FRAGMENT COMMAND... : exit status and message fragment
  local want="$1" fragment="$2"; shift 2
  local got msg
  msg="$("$@" 2>&1)"; got=$?
  [ "$got" -eq "$want" ] || { echo "  exit $got, want $want: $msg"; return 1; }
  contains "$msg" "$fragment"
}
check "mpirun.sh: -n is required" expect_status 2 "-n N is required" mpi bash "$root/launch/mpirun.sh" r.yaml
check "mpirun.sh: -n must be positive" expect_status 2 "-n '0'" mpi bash "$root/launch/mpirun.sh" -n 0 r.yaml
check "mpirun.sh: a recipe is required" expect_status 2 "no recipe" mpi bash "$root/launch/mpirun.sh" -n 2
check "mpirun.sh: missing hostfile" expect_status 2 "--hostfile '/nonexistent'" \
  mpi bash "$root/launch/mpirun.sh" -n 2 --hostfile /nonexistent r.yaml
check "mpirun.sh: missing binary" expect_status 2 "no tessera binary at '/nonexistent/tessera'" \
  env TESSERA_BIN=/nonexistent/tessera bash "$root/launch/mpirun.sh" -n 2 r.yaml

# slurm.sbatch with a stand-in srun that prints its arguments, NCCL_NVLS_ENABLE and
# OMP_NUM_THREADS (tests/e2e/slurm_test.sh submits it to a real Slurm).
mkdir -p "$tmp/bin"
cat >"$tmp/bin/srun" <<'EOF'
#!/usr/bin/env bash
printf 'srun nvls=%s omp=%s args=' "${NCCL_NVLS_ENABLE:-unset}" "${OMP_NUM_THREADS:-unset}"
printf '[%s]' "$@"
printf '\n'
EOF
chmod +x "$tmp/bin/srun"
slurm() {
  env -u NCCL_NVLS_ENABLE -u RECIPE -u SLURM_CPUS_PER_TASK OMP_NUM_THREADS=7 PATH="$tmp/bin:$PATH" SLURM_SUBMIT_DIR="$tmp" \
    TESSERA_BIN="$tmp/tessera" "$@" 2>&1
}
out="$(slurm bash "$root/launch/slurm.sbatch" recipes/x.yaml --set train.steps=5)"
check "slurm.sbatch: srun line" contains "$out" "srun nvls=unset omp=1 args=[--mpi=pmix][--kill-on-bad-exit=1][--cpus-per-task=1][--cpu-bind=cores][$tmp/tessera][train][recipes/x.yaml][--set][train.steps=5]"
out="$(slurm RECIPE=r.yaml TESSERA_SRUN_MPI=pmi2 TESSERA_SRUN_CPU_BIND=threads NCCL_NVLS_ENABLE=1 \
  SLURM_CPUS_PER_TASK=6 bash "$root/launch/slurm.sbatch" --set a.b=c)"
check "slurm.sbatch: RECIPE, pmi2, given NVLS, cpus per task" contains "$out" "srun nvls=1 omp=6 args=[--mpi=pmi2][--kill-on-bad-exit=1][--cpus-per-task=6][--cpu-bind=threads][$tmp/tessera][train][r.yaml][--set][a.b=c]"
check "slurm.sbatch: a recipe is required" expect_status 2 "give the recipe" slurm bash "$root/launch/slurm.sbatch"
check "slurm.sbatch: outside sbatch" expect_status 1 "submit this file with sbatch" \
  env -u SLURM_SUBMIT_DIR -u TESSERA_ROOT bash "$root/launch/slurm.sbatch" r.yaml

echo "$num_failed failed"
[ "$num_failed" -eq 0 ]

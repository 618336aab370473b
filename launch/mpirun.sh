#!/usr/bin/env bash
# Starts `tessera train` on N ranks with Open MPI's mpirun, on this node or on the hosts of a
# hostfile; prints the command, then runs it. N must equal dp * tp * pp of the recipe (tessera
# checks). Each rank picks its GPU itself from its node-local rank. See launch/README.md.
#   launch/mpirun.sh -n N [--hostfile FILE] [--per-node K] [--dry-run] RECIPE.yaml [--set k=v ...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat <<'EOF'
usage: launch/mpirun.sh -n N [--hostfile FILE] [--per-node K] [--dry-run] [--] RECIPE.yaml [--set section.key=value ...]
  -n, -np, --np N   number of ranks; must equal parallel.dp * parallel.tp * parallel.pp
  --hostfile FILE   Open MPI hostfile (one "host slots=K" line per node); default: this node
  --per-node K      K consecutive ranks per node (mpirun --map-by ppr:K:node); with GPUs, K is
                    the number of GPUs per node
  --dry-run         print the command and exit
Everything from RECIPE.yaml on (or after --) goes to `tessera train`.
Environment: TESSERA_BIN (default <repo>/build/src/cli/tessera), MPIRUN (default mpirun),
TESSERA_MPIRUN_ARGS (extra mpirun arguments, split on spaces, e.g. "--oversubscribe").
NCCL_* (e.g. NCCL_NVLS_ENABLE=0 where a site needs it), OMP_NUM_THREADS and TESSERA_* variables
(but the two above) that are set are forwarded to every rank (mpirun -x), so they reach other
nodes too.
EOF
}

fail() {
  echo "launch/mpirun.sh: $*" >&2
  exit 2
}

np="" hostfile="" per_node="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    -n | -np | --np)
      [ $# -ge 2 ] || fail "$1 needs a number of ranks"
      np="$2"; shift 2 ;;
    --np=*) np="${1#--np=}"; shift ;;
    --hostfile)
      [ $# -ge 2 ] || fail "--hostfile needs a file"
      hostfile="$2"; shift 2 ;;
    --hostfile=*) hostfile="${1#--hostfile=}"; shift ;;
    --per-node)
      [ $# -ge 2 ] || fail "--per-node needs a number of ranks"
      per_node="$2"; shift 2 ;;
    --per-node=*) per_node="${1#--per-node=}"; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;  # the recipe (or a --set): the rest goes to tessera train
  esac
done

[ -n "$np" ] || { usage >&2; fail "-n N is required (N = dp * tp * pp of the recipe)"; }
[[ "$np" =~ ^[1-9][0-9]*$ ]] || fail "-n '$np': expected a positive number of ranks"
[ -z "$per_node" ] || [[ "$per_node" =~ ^[1-9][0-9]*$ ]] ||
  fail "--per-node '$per_node': expected a positive number of ranks"
[ -z "$hostfile" ] || [ -r "$hostfile" ] || fail "--hostfile '$hostfile': no such readable file"
[ $# -ge 1 ] || fail "no recipe given (launch/mpirun.sh -n N RECIPE.yaml [--set k=v ...])"

bin="${TESSERA_BIN:-$root/build/src/cli/tessera}"
[ -x "$bin" ] || fail "no tessera binary at '$bin': build it with 'bash scripts/build.sh' or set TESSERA_BIN"
mpirun_bin="${MPIRUN:-mpirun}"
command -v "$mpirun_bin" >/dev/null 2>&1 || fail "'$mpirun_bin' not found: install Open MPI or set MPIRUN"

# Site knob: NVLink SHARP (NVLS) multicast. NCCL enables it by itself on NVSwitch systems and
# Tessera leaves it alone; a site whose hosts must not use it sets it off here or in the
# environment (like every NCCL_* variable, it is forwarded to all ranks).
# export NCCL_NVLS_ENABLE=0

cmd=("$mpirun_bin" -np "$np")
[ -z "$hostfile" ] || cmd+=(--hostfile "$hostfile")
[ -z "$per_node" ] || cmd+=(--map-by "ppr:$per_node:node")
# Forwarded by name (values stay in this environment): mpirun passes the environment to local
# ranks by itself, but to ranks on other hosts only what -x names.
while IFS= read -r name; do
  cmd+=(-x "$name")
done < <(compgen -e | grep -E '^(NCCL_|TESSERA_|OMP_NUM_THREADS$)' |
         grep -vxE 'TESSERA_(BIN|MPIRUN_ARGS)' | sort)
if [ -n "${TESSERA_MPIRUN_ARGS:-}" ]; then
  read -r -a extra <<<"$TESSERA_MPIRUN_ARGS"
  cmd+=("${extra[@]}")
fi
cmd+=("$bin" train "$@")

printf '+' >&2
printf ' %q' "${cmd[@]}" >&2
printf '\n' >&2
[ "$dry_run" -eq 0 ] || exit 0
# mpirun answers SIGTERM by killing the job (the ranks get TERM, then KILL a second later: too
# soon for a checkpoint), but forwards SIGUSR1, which tessera takes like TERM: finish the step,
# save, exit 0. So mpirun runs as a child, and a TERM for this script becomes a USR1 for mpirun
# (docs/CLUSTER.md). wait returns early when the trap runs; the last wait gives mpirun's status.
"${cmd[@]}" &
pid=$!
trap 'kill -USR1 "$pid" 2>/dev/null' TERM
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid" || true
done
status=0
wait "$pid" || status=$?
exit "$status"

#!/usr/bin/env bash
# Starts a private single-node Slurm cluster on this machine, runs COMMAND in it, then stops it:
#   scripts/slurm-local.sh COMMAND [ARG...]     e.g. scripts/slurm-local.sh bash (a shell in it)
# munged, slurmctld and slurmd run as the current user (root in CI containers) with every key,
# socket, state, spool and log file in one temporary directory; nothing in /etc, no systemd. The
# node is this machine as `localhost`, with the CPU topology that `slurmd -C` finds, in one
# partition `ci`. COMMAND runs with SLURM_CONF set, so sbatch/srun/salloc/sinfo talk to this
# cluster; SLURM_LOCAL_DIR names the directory (logs in log/).
#
# Exit status: COMMAND's; 77 (the ctest skip code) when the cluster cannot start here, with the
# reason on stderr: Slurm or munge not installed (scripts/install-deps.sh installs them), or a
# daemon that would not start or register. Debian 12's packages: slurm-wlm 22.05 (slurmctld,
# slurmd, slurm-client) and munge.
#
# Choices (docs/PARALLELISM.md, "Slurm"): auth/munge with a fresh key and a private munged;
# proctrack/linuxproc and task/affinity, which need no cgroups (a container without systemd has
# none to delegate) and still bind each task to its --cpus-per-task CPUs with sched_setaffinity;
# select/cons_tres with CR_Core. The node claims only the CPUs it has: Slurm refuses more tasks
# per node than CPUs unless the job overcommits (sbatch --overcommit), and a node that claims more
# (CPUs=4 with SlurmdParameters=config_overrides on 2 cores) cannot bind its tasks ("Unable to
# layout tasks on given cpus").
#
# Environment: SLURM_LOCAL_KEEP=1 keeps the directory afterwards (its logs); SLURM_LOCAL_TIMEOUT
# seconds to wait for the node to be idle (default 30).
set -uo pipefail

skip() {
  echo "slurm-local: SKIPPED: $*" >&2
  exit 77
}

[ $# -ge 1 ] || { echo "usage: scripts/slurm-local.sh COMMAND [ARG...]" >&2; exit 2; }
for tool in munged munge slurmctld slurmd sinfo scontrol; do
  command -v "$tool" >/dev/null 2>&1 ||
    skip "'$tool' not found: install slurm-wlm and munge (bash scripts/install-deps.sh)"
done

dir="$(mktemp -d "${TMPDIR:-/tmp}/slurm-local.XXXXXX")" || skip "cannot create a temporary directory"
chmod 755 "$dir"  # slurmd's job steps (the current user) read and write under it
mkdir -p "$dir/munge-key" "$dir/munge" "$dir/state" "$dir/spool" "$dir/log"
chmod 700 "$dir/munge-key"  # munged refuses a key others can read
export SLURM_CONF="$dir/slurm.conf" SLURM_LOCAL_DIR="$dir"

pids=()
cleanup() {
  local status=$?
  [ -f "$SLURM_CONF" ] && timeout 10 scontrol shutdown >/dev/null 2>&1
  # The daemons were started here; wait a moment for a clean exit, then end them by pid.
  local i
  for i in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    [ "$i" -eq 5 ] && for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.5
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  if [ "${SLURM_LOCAL_KEEP:-0}" = 1 ]; then
    echo "slurm-local: kept $dir" >&2
  else
    rm -rf "$dir"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Why the cluster did not come up: the last lines of the daemons' logs, then skip.
fail_start() {
  local f
  for f in "$dir"/log/*; do
    [ -s "$f" ] || continue
    echo "--- $f" >&2
    tail -n 15 "$f" >&2
  done
  skip "$*"
}

# A TCP port nobody listens on (IPv4 or IPv6), from /proc/net: no python or ss needed.
port_free() {
  local hex
  hex="$(printf '%04X' "$1")"
  ! grep -qsE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:[0-9A-F]+ 0A " /proc/net/tcp /proc/net/tcp6
}
pick_port_pair() {
  local p _
  for _ in $(seq 1 50); do
    p=$((20000 + RANDOM % 30000))
    if port_free "$p" && port_free $((p + 1)); then
      echo "$p"
      return 0
    fi
  done
  return 1
}
port="$(pick_port_pair)" || skip "no two free TCP ports found"

# munge: a fresh key and a private daemon on its own socket.
dd if=/dev/urandom of="$dir/munge-key/munge.key" bs=1024 count=1 status=none
chmod 400 "$dir/munge-key/munge.key"
munge_socket="$dir/munge/munge.socket"
munged --force --foreground --socket="$munge_socket" --key-file="$dir/munge-key/munge.key" \
  --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munged.seed" \
  --log-file="$dir/log/munged.log" >"$dir/log/munged.out" 2>&1 &
pids+=($!)
for _ in $(seq 1 50); do
  [ -S "$munge_socket" ] && break
  sleep 0.1
done
munge --socket="$munge_socket" --no-input 2>/dev/null |
  unmunge --socket="$munge_socket" >/dev/null 2>&1 || fail_start "munged did not start"

# The node as slurmd sees this machine: "NodeName=host CPUs=.. Boards=.. SocketsPerBoard=..
# CoresPerSocket=.. ThreadsPerCore=.. RealMemory=..", renamed localhost.
hw="$(slurmd -C 2>/dev/null | head -n 1)"
[[ "$hw" == NodeName=* ]] || skip "slurmd -C cannot read this machine's CPUs: $hw"
hw="${hw#NodeName=* }"
user="$(id -un)"
cat >"$SLURM_CONF" <<EOF
# Written by scripts/slurm-local.sh: a private single-node cluster, everything under $dir.
ClusterName=tessera-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=ci Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF

slurmctld -D -f "$SLURM_CONF" >"$dir/log/slurmctld.out" 2>&1 &
pids+=($!)
slurmd -D -f "$SLURM_CONF" -N localhost >"$dir/log/slurmd.out" 2>&1 &
pids+=($!)

deadline=$((SECONDS + ${SLURM_LOCAL_TIMEOUT:-30}))
state=""
while [ "$SECONDS" -lt "$deadline" ]; do
  for p in "${pids[@]}"; do
    kill -0 "$p" 2>/dev/null || fail_start "a daemon exited during start-up (pid $p)"
  done
  state="$(sinfo -h -N -n localhost -o %t 2>/dev/null)"
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] || fail_start "the node is not idle after ${SLURM_LOCAL_TIMEOUT:-30} s (state '${state:-none}')"
echo "slurm-local: cluster up in $dir (node localhost: $hw)" >&2

"$@"

#!/usr/bin/env bash
# `make test-slurm`: a real single-node SLURM cluster on this machine (CPU only, one fake GPU
# declared as gres; partitions cpu and gpu as slurm/partitions.yaml names them), then
# tests/slurm/test_cluster.py runs `snakemake --profile <clone>/slurm` on a tiny demo target
# through it, from outside the repository. Installs Debian's slurm and munge when missing; stops only the daemons
# it started (also on failure). Needs root (apt, daemons); no accounting database.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
PY="$ROOT/.venv/bin/python"
PORT="${SLURM_TEST_PORT:-6817}"          # slurmctld port; slurmd listens on PORT+1
STATE="$(mktemp -d /tmp/histodistill-slurm.XXXXXX)"
STARTED=()                               # pid files of the daemons this script started
HOST="$(hostname -s)"
CONF=/etc/slurm
WROTE_CONF=

log() { echo "test-slurm: $*"; }

stop() {
  local rc=$?
  trap '' INT TERM HUP PIPE       # finish the cleanup whatever happens to the terminal
  if [ -n "$WROTE_CONF" ]; then   # jobs left by a failed run: their steps outlive slurmd
    timeout 10 squeue -h -o %i 2>/dev/null | xargs -r timeout 10 scancel 2>/dev/null || true
  fi
  for pidfile in "${STARTED[@]}"; do
    [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  for pidfile in "${STARTED[@]}"; do   # wait for each to exit (kill it after 10 s)
    for _ in $(seq 50); do
      [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null || continue 2
      sleep 0.2
    done
    kill -9 "$(cat "$pidfile")" 2>/dev/null || true
  done
  if [ "$rc" -ne 0 ]; then
    log "failed; slurmctld/slurmd logs follow"
    tail -n 20 "$STATE"/slurmctld.log "$STATE"/slurmd.log 2>/dev/null || true
  fi
  rm -rf "$STATE"
  [ -n "$WROTE_CONF" ] && rm -f "$CONF/slurm.conf" "$CONF/gres.conf"
  exit "$rc"
}
trap stop EXIT
trap 'exit 1' INT TERM HUP PIPE   # through the EXIT trap: the daemons are stopped on signals too

install_missing() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ ${#missing[@]} -eq 0 ] && return
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munge already running; using it"
    return
  fi
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
  mkdir -p /run/munge && chown munge:munge /run/munge
  runuser -u munge -- munged --force
  STARTED+=(/run/munge/munged.pid)
  munge -n | unmunge >/dev/null
}

write_config() {
  # srun inside each job reads only the default path (slurmd drops SLURM_CONF from the job)
  if [ -e "$CONF/slurm.conf" ]; then
    # A run killed outright (SIGKILL skips the EXIT trap) leaves its own file behind: replace
    # that one when no slurmctld runs; any other slurm.conf belongs to this machine's SLURM.
    if grep -qx "ClusterName=histodistill-ci" "$CONF/slurm.conf" && ! pgrep -x slurmctld >/dev/null; then
      log "$CONF/slurm.conf is left over from a killed run of this script; replacing it"
    else
      log "$CONF/slurm.conf exists (a SLURM install of this machine); not replacing it"; exit 1
    fi
  fi
  WROTE_CONF=1
  local cpus=8 mem=64000   # declared beyond this machine (config_overrides) so the profile's
  mkdir -p "$STATE/ctld" "$STATE/spool"  # per-rule mem_mb/threads fit; nothing enforces them
  mknod "$STATE/gpu0" c 1 3              # the fake GPU: a clone of /dev/null
  cat >"$CONF/slurm.conf" <<EOF
ClusterName=histodistill-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskProlog=$STATE/task_prolog.sh
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
DefMemPerCPU=1000
EnforcePartLimits=ALL
# finished jobs stay visible to scontrol for the GPU check, however long the run (>= 300 for the plugin)
MinJobAge=3600
ReturnToService=2
MailProg=/bin/true
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.txt
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$HOST Default=YES MaxTime=2880 State=UP
PartitionName=gpu Nodes=$HOST MaxTime=2880 State=UP
EOF
  echo "NodeName=$HOST Name=gpu File=$STATE/gpu0" >"$CONF/gres.conf"
  # Runs inside every task with the job's environment: SLURM's own record of the GPU it gave.
  cat >"$STATE/task_prolog.sh" <<EOF
#!/bin/sh
echo "\$SLURM_JOB_ID \${CUDA_VISIBLE_DEVICES:-none}" >>"$STATE/task_env.txt"
EOF
  chmod +x "$STATE/task_prolog.sh"
}

start_slurm() {
  if ss -ltn 2>/dev/null | grep -qE ":($PORT|$((PORT + 1)))\b"; then
    log "port $PORT or $((PORT + 1)) is in use (another cluster?); set SLURM_TEST_PORT"; exit 1
  fi
  slurmctld && STARTED+=("$STATE/slurmctld.pid")
  slurmd && STARTED+=("$STATE/slurmd.pid")
  local deadline=$((SECONDS + 60))
  while [ "$SECONDS" -lt "$deadline" ]; do
    kill -0 "$(cat "$STATE/slurmctld.pid" 2>/dev/null)" 2>/dev/null || break
    timeout 5 sinfo -h -N -o %t 2>/dev/null | grep -qx idle && return
    sleep 0.5
  done
  log "node $HOST did not become idle (slurmctld: $STATE/slurmctld.log)"; exit 1
}

SECONDS=0
install_missing
start_munge
write_config
start_slurm
log "cluster up in ${SECONDS}s ($(sinfo -h -o '%P %D %c %G'))"
HISTODISTILL_SLURM_STATE="$STATE" PYTHONPATH="$ROOT" \
  "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/slurm"
log "done in ${SECONDS}s"

#!/usr/bin/env bash
# Start a one-node Slurm (munged + slurmctld + slurmd) on this machine, for the submitit tests and for trying the
# submitit_*.py launchers without a cluster. Debian/Ubuntu, run as root.
#
#   bash scripts/start-local-slurm.sh      # installs slurm-wlm + munge with apt-get if missing; safe to run twice
#   bash scripts/stop-local-slurm.sh       # stops what this script started
#
# Everything it writes (state, spool, pid files, daemon logs) lives under $SLURM_LOCAL_DIR (default
# /tmp/slurm-local), except /etc/slurm/slurm.conf and, when absent, /etc/munge/munge.key. One node named after
# this host, one partition 'debug' (the default) with all CPUs. No cgroups (proctrack/linuxproc, task/none) and no
# accounting daemon, so it also runs inside containers; `sacct` is unavailable.
set -euo pipefail

STATE=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
CONF=/etc/slurm/slurm.conf
WAIT_S=${SLURM_LOCAL_WAIT_S:-60}

log() { echo "start-local-slurm: $*"; }
fail() {
  echo "start-local-slurm: ERROR: $*" >&2
  echo "start-local-slurm: logs: $STATE/log/slurmctld.log, $STATE/log/slurmd.log, $STATE/log/munged*.log" >&2
  for f in "$STATE"/log/*.log; do
    [ -s "$f" ] && { echo "---- last lines of $f" >&2; tail -n 15 "$f" >&2; }
  done
  exit 1
}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_ready() { sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc|comp)'; }

host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 * 8 / 10))
new_conf=$(
  cat <<EOF
# Written by scripts/start-local-slurm.sh (ChannelMAE); state and logs under $STATE
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=30
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmdTimeout=60
KillWait=10
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
)
# Fast path: our daemons run with this configuration and the node takes jobs.
if [ "$(cat "$CONF" 2>/dev/null)" = "$new_conf" ] && alive "$STATE/slurmctld.pid" && alive "$STATE/slurmd.pid" &&
  node_ready; then
  log "already running (node $host, partition debug; logs in $STATE/log)"
  exit 0
fi

[ "$(id -u)" = 0 ] || fail "must run as root (it installs packages and starts daemons)"
mkdir -p "$STATE"/state "$STATE"/spool "$STATE"/log /etc/slurm
# Jobs reach each other (torch.distributed's MASTER_ADDR) through the node name, so it must resolve.
if ! getent hosts "$host" >/dev/null; then
  echo "127.0.0.1 $host" >>/etc/hosts
  log "added '127.0.0.1 $host' to /etc/hosts"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null ||
  ! command -v munged >/dev/null; then
  log "installing slurm-wlm and munge with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || fail "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || fail "apt-get install failed"
fi

if [ "$(cat "$CONF" 2>/dev/null)" != "$new_conf" ]; then
  # A changed configuration (other host name, CPU count, state dir) needs fresh daemons.
  for p in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    if alive "$p"; then
      kill "$(cat "$p")"
      for _ in $(seq 50); do alive "$p" || break; sleep 0.2; done
    fi
  done
  printf '%s\n' "$new_conf" >"$CONF"
  log "wrote $CONF"
fi

# munge: one key, one daemon (a munged started by someone else is fine as long as it answers).
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  touch "$STATE/log/munged.log" && chown munge:munge "$STATE/log/munged.log" && chmod 640 "$STATE/log/munged.log"
  su -s /bin/sh munge -c "/usr/sbin/munged --log-file=$STATE/log/munged.log" 2>>"$STATE/log/munged.err.log" ||
    fail "munged did not start"
  for _ in $(seq 25); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || fail "munge does not answer"
fi

alive "$STATE/slurmctld.pid" || /usr/sbin/slurmctld || fail "slurmctld did not start"
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
alive "$STATE/slurmd.pid" || /usr/sbin/slurmd || fail "slurmd did not start"

deadline=$((SECONDS + WAIT_S))
while ((SECONDS < deadline)); do
  if node_ready; then
    log "up: node $host, partition debug, $cpus CPUs, ${mem_mb} MB (state and logs in $STATE)"
    exit 0
  fi
  # A node left down/drained by an earlier run (e.g. 'unexpectedly rebooted') is put back into service.
  if sinfo -h -N -o '%t' 2>/dev/null | grep -qE '^(down|drain|drng|fail)'; then
    scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  fi
  sleep 0.5
done
fail "node $host did not become idle within $WAIT_S s; sinfo: $(sinfo -h -N 2>&1 | head -n 1)"

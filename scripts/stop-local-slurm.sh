#!/usr/bin/env bash
# Stop the slurmd and slurmctld that scripts/start-local-slurm.sh started (by their pid files under
# $SLURM_LOCAL_DIR, default /tmp/slurm-local). munged is left running; Slurm state stays for the next start.
set -u
STATE=${SLURM_LOCAL_DIR:-/tmp/slurm-local}
for name in slurmd slurmctld; do
  pidfile="$STATE/$name.pid"
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || continue
  kill "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  echo "stop-local-slurm: stopped $name (pid $pid)"
done
exit 0

#!/usr/bin/env bash
# Stop the single-node SLURM that tests/slurm/start_local_slurm.sh started.
#
#   bash tests/slurm/stop_local_slurm.sh           # cancel jobs, stop slurmd, slurmctld, munged
#   bash tests/slurm/stop_local_slurm.sh --clean   # ... and remove its state, logs and slurm.conf
#
# Only processes whose pid files the start script created are signalled; munged is stopped only
# when the start script started it (an already running munged is left alone). Packages stay
# installed. Safe to run when nothing is running.
set -uo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
CONF=/etc/slurm/slurm.conf
MARKER="# written by noduleflow tests/slurm/start_local_slurm.sh"
say() { echo "[stop_local_slurm] $*"; }

stop_pidfile() {  # stop_pidfile NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local name=$1 pidfile=$2 pid
    [ -s "$pidfile" ] || { say "$name: no pid file"; return 0; }
    pid=$(cat "$pidfile")
    if ! kill -0 "$pid" 2>/dev/null; then say "$name: not running"; rm -f "$pidfile"; return 0; fi
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; say "$name ($pid) killed"; else say "$name ($pid) stopped"; fi
    rm -f "$pidfile"
}

# jobs first, while slurmctld and slurmd can still clean up their steps
if [ -s "$DIR/run/slurmctld.pid" ] && command -v squeue >/dev/null && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -t pending,running,configuring,completing -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 50); do
            [ -z "$(squeue -h -t pending,running,configuring,completing -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

stop_pidfile slurmd "$DIR/run/slurmd.pid"
stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
if [ -s "$DIR/run/started-munged" ]; then
    stop_pidfile munged "$(cat "$DIR/run/started-munged")"
    rm -f "$DIR/run/started-munged"
else
    say "munged: not started by start_local_slurm.sh, left alone"
fi

if [ "${1:-}" = "--clean" ]; then
    rm -rf "$DIR"
    if [ -e "$CONF" ] && head -n1 "$CONF" | grep -qF "$MARKER"; then rm -f "$CONF"; fi
    say "removed $DIR and $CONF"
fi
exit 0

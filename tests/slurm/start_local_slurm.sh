#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine for tests/test_slurm.py.
#
#   sudo bash tests/slurm/start_local_slurm.sh     # as root; idempotent (a second call only checks)
#   bash tests/slurm/stop_local_slurm.sh           # stops what this script started
#
# What it does, on Debian 12 (slurm-wlm 22.05):
#   1. installs slurmctld, slurmd, slurm-client and munge with apt (skipped when installed);
#      service starts are blocked during the install (no systemd involved at any point);
#   2. writes /etc/slurm/slurm.conf: one node "localhost" at 127.0.0.1 whose sockets, cores,
#      threads and memory come from `slurmd -C`; one partition "debug"; no accounting database
#      (job state comes from squeue, kept for MinJobAge=900 s after a job ends);
#   3. creates a munge key when there is none and starts munged, slurmctld and slurmd by hand;
#   4. waits until `sinfo` shows the node idle and prints how long everything took.
#
# Every address in the configuration is 127.0.0.1 and every request is authenticated by the
# local munge key. Jobs run as the submitting user (root in CI: SLURM allows root jobs).
# Daemon state, logs and pid files live under $SLURM_LOCAL_DIR (default /var/lib/slurm-local).
# An existing /etc/slurm/slurm.conf that this script did not write is never overwritten.
#
# Environment:
#   SLURM_LOCAL_DIR          state/log/pid folder (default /var/lib/slurm-local)
#   SLURM_START_TIMEOUT      seconds to wait for the node to become idle (default 90)
#   SLURM_SKIP_APT=1         never call apt-get (fail if the packages are missing)
set -euo pipefail

START_NS=$(date +%s%N)
elapsed() { echo $(( ($(date +%s%N) - START_NS) / 1000000 )) | awk '{printf "%.1f", $1/1000}'; }
say() { echo "[start_local_slurm $(elapsed)s] $*"; }
die() { echo "[start_local_slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"

DIR=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
TIMEOUT=${SLURM_START_TIMEOUT:-90}
CONF=/etc/slurm/slurm.conf
MARKER="# written by noduleflow tests/slurm/start_local_slurm.sh"
PACKAGES=(slurmctld slurmd slurm-client munge)

# ------------------------------------------------------------------ 1. packages
installed() {  # true when every named package is installed
    [ "$(dpkg-query -W -f='${Status}\n' "$@" 2>/dev/null | grep -c '^install ok installed$')" -eq "$#" ]
}

if installed "${PACKAGES[@]}"; then
    say "packages already installed: ${PACKAGES[*]}"
else
    [ "${SLURM_SKIP_APT:-0}" = 1 ] && die "packages missing (${PACKAGES[*]}) and SLURM_SKIP_APT=1"
    command -v apt-get >/dev/null || die "apt-get not found: this script expects Debian 12"
    # Block service starts during the install (Debian's convention: policy-rc.d exit 101), so
    # that no init system starts munge/slurm with the package defaults behind our back.
    POLICY=/usr/sbin/policy-rc.d
    OUR_POLICY=0
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$POLICY"
        chmod 755 "$POLICY"
        OUR_POLICY=1
        trap 'rm -f "$POLICY"' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    retry() {  # a mirror hiccup should not fail CI: 3 tries, 5 s apart
        local i
        for i in 1 2 3; do "$@" && return 0; [ "$i" = 3 ] || { say "retrying: $*"; sleep 5; }; done
        return 1
    }
    say "apt-get update"
    retry apt-get update -qq || die "apt-get update failed"
    say "apt-get install ${PACKAGES[*]}"
    retry apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null \
        || die "apt-get install ${PACKAGES[*]} failed"
    if [ "$OUR_POLICY" = 1 ]; then rm -f "$POLICY"; trap - EXIT; fi
    say "packages installed"
fi

# ------------------------------------------------------------------ 2. slurm.conf
mkdir -p "$DIR"/{state,spool,log,run} /etc/slurm

# "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=23000"
HW=$(slurmd -C | head -n1)
field() { echo "$HW" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
CPUS=$(field CPUs); BOARDS=$(field Boards); SOCKETS=$(field SocketsPerBoard)
CORES=$(field CoresPerSocket); THREADS=$(field ThreadsPerCore); MEM=$(field RealMemory)
[ -n "$CPUS" ] && [ -n "$MEM" ] || die "could not parse 'slurmd -C': $HW"
# leave a little memory to the daemons and the submitting snakemake
MEM=$(( MEM > 2048 ? MEM - 512 : MEM ))

NEW_CONF=$(cat <<EOF
$MARKER
# A single-node test cluster: loopback only, no accounting database, no cgroups, no systemd.
ClusterName=noduleflow
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MailProg=/bin/true
# finished jobs stay visible to squeue/scontrol this long (the snakemake plugin polls squeue)
MinJobAge=900
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=$CPUS Boards=$BOARDS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)

if [ -e "$CONF" ] && ! head -n1 "$CONF" | grep -qF "$MARKER"; then
    die "$CONF exists and was not written by this script; refusing to overwrite it"
fi
CONF_CHANGED=0
if [ ! -e "$CONF" ] || [ "$(cat "$CONF")" != "$NEW_CONF" ]; then
    printf '%s\n' "$NEW_CONF" >"$CONF"
    CONF_CHANGED=1
    say "wrote $CONF (node: CPUs=$CPUS sockets=$SOCKETS cores/socket=$CORES threads/core=$THREADS RealMemory=${MEM}MB)"
fi

# ------------------------------------------------------------------ 3. munge
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already answers"
else
    KEY=/etc/munge/munge.key
    if [ ! -s "$KEY" ]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile="$KEY" --force; else
            dd if=/dev/urandom of="$KEY" bs=1 count=1024 status=none; fi
        say "created $KEY"
    fi
    chown munge:munge "$KEY" /etc/munge; chmod 0400 "$KEY"; chmod 0700 /etc/munge
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
    echo "/run/munge/munged.pid" >"$DIR/run/started-munged"
    say "munged started"
fi

# ------------------------------------------------------------------ 4. slurmctld + slurmd
if [ "$CONF_CHANGED" = 1 ]; then
    # the daemons we started read the old file: restart them
    for d in slurmd slurmctld; do
        if alive "$DIR/run/$d.pid"; then
            kill "$(cat "$DIR/run/$d.pid")"
            for _ in $(seq 100); do alive "$DIR/run/$d.pid" || break; sleep 0.1; done
            say "stopped $d (configuration changed)"
        fi
    done
fi
if alive "$DIR/run/slurmctld.pid"; then say "slurmctld already running"; else
    /usr/sbin/slurmctld -f "$CONF"
    say "slurmctld started"
fi
if alive "$DIR/run/slurmd.pid"; then say "slurmd already running"; else
    /usr/sbin/slurmd -f "$CONF" -N localhost
    say "slurmd started"
fi

show_logs() {
    echo "----- sinfo -R / scontrol show node" >&2
    sinfo -R >&2 || true
    scontrol show node localhost >&2 || true
    for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.log /var/log/munge/munged.log; do
        echo "----- tail $f" >&2
        tail -n 40 "$f" >&2 2>/dev/null || echo "(missing)" >&2
    done
}

deadline=$(( $(date +%s) + TIMEOUT ))
state=""
while :; do
    state=$(sinfo -h -N -n localhost -o %T 2>/dev/null | head -n1 || true)
    case "$state" in
        idle|mixed|allocated) break ;;
    esac
    # a node that registered after being marked down returns by itself (ReturnToService=2);
    # an explicit resume covers a node left down/drained by an earlier run
    case "$state" in
        down*|drain*) scontrol update nodename=localhost state=resume 2>/dev/null || true ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
        show_logs
        die "node 'localhost' not idle after ${TIMEOUT}s (state: '${state:-no answer from slurmctld}')"
    fi
    sleep 0.5
done

say "node localhost is $state"

# smoke test: one real job step through slurmctld, slurmd, slurmstepd and back to srun
if ! out=$(timeout 60 srun --quiet -N1 -n1 --mem=50 -t 1 -J start_local_slurm_check echo ok 2>&1) \
        || [ "$out" != ok ]; then
    show_logs
    die "a test job did not run: $out"
fi

say "SLURM is up: node localhost, partition debug, $CPUS CPUs, ${MEM} MB (total $(elapsed) s)"

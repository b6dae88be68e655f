#!/usr/bin/env bash
# Stop the daemons tests/slurm/start_cluster.sh started, by the PIDs in their pid files, and only them:
# a pid file whose process is gone or is not the expected program is skipped. Jobs still in the
# cluster (a test that timed out) are cancelled first. Removes the config files the start script wrote.
set -uo pipefail

STATE=${DFAKD_SLURM_STATE:-/tmp/dfakd-slurm}
MARKER="# written by dfakd tests/slurm/start_cluster.sh"
export PATH=$PATH:/usr/sbin:/sbin

log() { echo "stop_cluster: $*" >&2; }

if [ -s "$STATE/slurmctld.pid" ] && command -v scancel >/dev/null 2>&1; then
    timeout 10 scancel --full --quiet --partition="${DFAKD_SLURM_PARTITION:-debug}" 2>/dev/null || true
fi

stop_pid() {  # name pidfile
    local name=$1 pidfile=$2 pid comm
    [ -s "$pidfile" ] || return 0
    pid=$(tr -dc '0-9' <"$pidfile")
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    if [ -z "$pid" ] || [ "$comm" != "$name" ]; then
        log "$name: pid ${pid:-?} from $pidfile is not running $name (comm '${comm}'), skipped"
        rm -f "$pidfile"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 100); do
        [ -e "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -e "/proc/$pid" ]; then
        log "$name ($pid) ignored SIGTERM for 10 s; SIGKILL"
        kill -KILL "$pid" 2>/dev/null
    fi
    log "stopped $name ($pid)"
    rm -f "$pidfile"
}

stop_pid slurmd "$STATE/slurmd.pid"
stop_pid slurmctld "$STATE/slurmctld.pid"
stop_pid munged "$STATE/munged.pid"
rm -f /run/munge/dfakd-test-munged.pid

for f in /etc/slurm/slurm.conf /etc/slurm/gres.conf; do
    if [ -e "$f" ] && grep -qF "$MARKER" "$f"; then
        rm -f "$f"
    fi
done
exit 0

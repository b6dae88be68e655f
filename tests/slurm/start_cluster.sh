#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine for tests/test_slurm.py (root only).
#
# - installs Debian's slurm-wlm and munge if missing (apt-get; CI runs this as root too),
# - writes /etc/slurm/slurm.conf and /etc/slurm/gres.conf (the default path: the SLURM executor
#   plugin drops SLURM_CONF inside jobs, so a config anywhere else is not seen by the job's srun),
#   for one node named after `hostname -s` with all its CPUs, a bit less memory than it has, and one
#   fake GPU (a gpu gres whose device file is /dev/null), in partition "debug",
# - starts munged (unless one already answers), slurmctld and slurmd as daemons with pid files under
#   $DFAKD_SLURM_STATE (default /tmp/dfakd-slurm), and waits until `sinfo` shows the node idle.
#
# tests/slurm/stop_cluster.sh stops exactly the daemons this script started, by their recorded PIDs.
# Exit status: 0 ready; 2 not root; 3 packages cannot be installed; 4 a foreign slurm.conf exists;
# 5 a daemon did not start or the node did not come up (see the logs in $DFAKD_SLURM_STATE).
set -euo pipefail

STATE=${DFAKD_SLURM_STATE:-/tmp/dfakd-slurm}
PARTITION=${DFAKD_SLURM_PARTITION:-debug}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
GRES_CONF=$CONF_DIR/gres.conf
MARKER="# written by dfakd tests/slurm/start_cluster.sh"
WAIT_S=${DFAKD_SLURM_WAIT_S:-60}

log() { echo "start_cluster: $*" >&2; }
die() { local code=$1; shift; log "ERROR: $*"; exit "$code"; }

[ "$(id -u)" -eq 0 ] || die 2 "must run as root (installs packages, writes $CONF, starts daemons)"

# ---- packages ------------------------------------------------------------------------------------
need_install=0
for bin in munged slurmctld slurmd sbatch squeue sinfo scontrol; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_install=1
done
if [ "$need_install" -eq 1 ]; then
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >"$STATE.apt.log" 2>&1 || { cat "$STATE.apt.log" >&2; die 3 "apt-get update failed"; }
    apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$STATE.apt.log" 2>&1 \
        || { tail -n 30 "$STATE.apt.log" >&2; die 3 "apt-get install slurm-wlm munge failed"; }
fi
export PATH=$PATH:/usr/sbin:/sbin

# ---- a previous run's daemons (crashed test): stop them first -------------------------------------
if ls "$STATE"/*.pid >/dev/null 2>&1; then
    log "stopping daemons left over from a previous run"
    "$(dirname "$0")/stop_cluster.sh" || true
fi
mkdir -p "$STATE/ctld" "$STATE/slurmd"
chmod 755 "$STATE"

# ---- munge ---------------------------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge /etc/munge/munge.key
chmod 700 /etc/munge
chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge

if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running (not started here; left alone by stop_cluster.sh)"
else
    # munged runs as the munge user (it refuses a key owned by another user); --force: a stale
    # socket from a killed munged is not an error
    runuser -u munge -- /usr/sbin/munged --force --pid-file="/run/munge/dfakd-test-munged.pid" \
        || die 5 "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 50); do [ -s /run/munge/dfakd-test-munged.pid ] && break; sleep 0.1; done
    cp /run/munge/dfakd-test-munged.pid "$STATE/munged.pid"
    munge -n | unmunge >/dev/null || die 5 "munge does not answer"
fi

# ---- slurm.conf / gres.conf ----------------------------------------------------------------------
HOST=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REAL_MB=$((MEM_MB * 9 / 10))  # a bit under what slurmd detects, or the node would be drained

for f in "$CONF" "$GRES_CONF"; do
    if [ -e "$f" ] && ! grep -qF "$MARKER" "$f"; then
        die 4 "$f exists and was not written by this script: refusing to overwrite a real cluster's config"
    fi
done
mkdir -p "$CONF_DIR"
cat >"$CONF" <<CONF
$MARKER; removed by stop_cluster.sh
ClusterName=dfakdtest
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# status checks use squeue (no accounting): finished jobs must stay visible long enough
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MB Gres=gpu:1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
cat >"$GRES_CONF" <<CONF
$MARKER; removed by stop_cluster.sh
# a fake GPU: one gpu gres whose device file is /dev/null, so jobs asking --gpus=1 are schedulable
AutoDetect=off
NodeName=$HOST Name=gpu File=/dev/null
CONF
chmod 644 "$CONF" "$GRES_CONF"

# ---- daemons -------------------------------------------------------------------------------------
# -c: ignore saved state (a fresh cluster); both daemonize and write their pid files (see above)
/usr/sbin/slurmctld -c || die 5 "slurmctld did not start: $(tail -n 20 "$STATE/slurmctld.log" 2>/dev/null)"
for _ in $(seq 100); do scontrol ping >/dev/null 2>&1 && break; sleep 0.2; done
scontrol ping >/dev/null 2>&1 || die 5 "slurmctld does not answer: $(tail -n 20 "$STATE/slurmctld.log")"
/usr/sbin/slurmd -c || die 5 "slurmd did not start: $(tail -n 20 "$STATE/slurmd.log" 2>/dev/null)"

t_wait=$SECONDS
deadline=$((SECONDS + WAIT_S))
state=""
while [ $SECONDS -lt $deadline ]; do
    state=$(sinfo --noheader --nodes="$HOST" --format=%T 2>/dev/null | head -n 1 || true)
    [ "$state" = "idle" ] && break
    case "$state" in inval* | drain* | down*) [ $((SECONDS - t_wait)) -gt 10 ] && break ;; esac  # not registering
    sleep 1
done
if [ "$state" != "idle" ]; then
    scontrol show node "$HOST" >&2 || true
    tail -n 20 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
    die 5 "node $HOST is '${state:-unknown}', not idle, after $((SECONDS - t_wait))s"
fi
log "node $HOST idle in partition $PARTITION (CPUs=$CPUS RealMemory=$REAL_MB Gres=gpu:1); state in $STATE"

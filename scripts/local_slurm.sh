#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (localhost), for trying and testing
# `prepretrain pipeline executor=slurm` without a cluster. Debian/Ubuntu, as root.
#
#   scripts/local_slurm.sh start    # install slurm-wlm + munge if missing, configure, start, wait until idle
#   scripts/local_slurm.sh status   # sinfo + squeue
#   scripts/local_slurm.sh stop     # stop the daemons (the configuration and state stay)
#
# The node is this machine with all its CPUs and no GPUs, in one partition `local`; memory is
# not a consumable resource (jobs ask for CPUs only). The files it writes: /etc/slurm/slurm.conf
# (only if absent or written by this script before) and state under $LOCAL_SLURM_STATE
# (default /var/lib/prepretrain-slurm).
set -euo pipefail

STATE="${LOCAL_SLURM_STATE:-/var/lib/prepretrain-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by prepretrain scripts/local_slurm.sh"

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "local_slurm.sh: run as root (it installs packages and starts daemons)" >&2
        exit 1
    fi
}

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    echo "local_slurm.sh: installing slurm-wlm and munge" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
    fi
}

configure() {
    local host cpus mem_mb
    host="$(hostname -s)"
    cpus="$(nproc --all)"
    mem_mb="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        echo "local_slurm.sh: $CONF exists and was not written by this script; not touching it" >&2
        exit 1
    fi
    mkdir -p "$STATE"/{ctld,spool,log} /etc/slurm /run/munge /var/log/munge /var/lib/munge
    cat >"$CONF" <<CONF
$MARK
ClusterName=localhost
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
}

running() {  # a live process of that name (a zombie left by a stopped daemon does not count)
    ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'
}

start() {
    need_root
    install
    configure
    running munged || runuser -u munge -- munged 2>/dev/null || munged --force
    running slurmctld || slurmctld
    running slurmd || slurmd
    local host
    host="$(hostname -s)"
    for _ in $(seq 1 60); do
        if sinfo -h -n "$host" -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
            echo "local_slurm.sh: SLURM is up: partition local, node $host ($(nproc --all) CPUs)"
            return
        fi
        scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
        sleep 0.5
    done
    echo "local_slurm.sh: the node did not become idle; logs in $STATE/log" >&2
    sinfo >&2 || true
    exit 1
}

stop() {
    need_root
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
    echo "local_slurm.sh: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

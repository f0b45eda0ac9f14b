#!/usr/bin/env bash
# Single-node Slurm cluster on localhost, for tests and CI (Debian's Slurm 22.05 packages, no
# systemd). Everything (config, state, spool, logs, pid files, munge key and socket) lives in DIR.
#
#   sweeps/local_slurm.sh install    apt-get the daemons, clients and munge (skips if present)
#   sweeps/local_slurm.sh start DIR  start munged, slurmctld and slurmd; writes DIR/env.sh
#   sweeps/local_slurm.sh stop DIR   cancel every job, then stop the three daemons
#
# Afterwards `source DIR/env.sh` points sbatch, squeue, ... at the cluster. A second cluster beside
# a running one (e.g. the tests' while a sweep runs) takes other ports:
#   LOOPLM_SLURM_PORTS="7817 7818" sweeps/local_slurm.sh start DIR    (slurmctld's, slurmd's)
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

PACKAGES=(slurmctld slurmd slurm-client munge)
DAEMONS=(slurmd slurmctld munged)
START_TIMEOUT_S=30
STOP_TIMEOUT_S=30
read -r CTLD_PORT SLURMD_PORT <<<"${LOOPLM_SLURM_PORTS:-6817 6818}"
[[ $CTLD_PORT =~ ^[0-9]+$ && $SLURMD_PORT =~ ^[0-9]+$ ]] \
    || { echo "local_slurm.sh: LOOPLM_SLURM_PORTS='${LOOPLM_SLURM_PORTS:-}': allowed is two port numbers" >&2; exit 2; }

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null | grep -c '^installed$') \
        -eq ${#PACKAGES[@]} ]]
}

install() {
    if installed; then
        echo "Slurm already installed: ${PACKAGES[*]}"
        return
    fi
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
}

write_conf() {
    local dir=$1 host node
    host=$(hostname -s)
    node=$(slurmd -C | head -n1)
    [[ $node == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node"
    cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
MailProg=/bin/true
ReturnToService=2
# An afterok job whose dependency failed is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
JobRequeue=1
# scontrol show job still answers for 5 min after a job ended (no sacct without slurmdbd).
MinJobAge=300
# Start jobs as soon as they are submitted or unblocked, not in batches up to 3 s apart.
SchedulerParameters=batch_sched_delay=0
$node
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "export SLURM_CONF=$dir/slurm.conf" >"$dir/env.sh"
}

print_logs() {
    local dir=$1 log
    for log in "$dir"/log/*.log; do
        echo "===== $log" >&2
        tail -n 40 "$log" >&2
    done
}

start() {
    local dir port
    dir=$(mkdir -p "$1" && cd "$1" && pwd)
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            die "port $port is in use: is another Slurm cluster running? ($0 stop ITS_DIR)"
        fi
    done
    mkdir -p "$dir"/{state,spool,run,log,munge}
    # munged wants its socket folder mode 711 and every folder above it searchable by all.
    chmod a+x "$dir"
    chmod 711 "$dir/munge"
    write_conf "$dir"
    export SLURM_CONF=$dir/slurm.conf

    [[ -f $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key"
    munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munge.seed" \
        || { print_logs "$dir"; die "munged did not start"; }
    slurmctld || { print_logs "$dir"; die "slurmctld did not start"; }
    slurmd || { print_logs "$dir"; die "slurmd did not start"; }

    local deadline=$((SECONDS + START_TIMEOUT_S))
    until [[ $(sinfo -h -o %t 2>/dev/null) == idle ]]; do
        if ((SECONDS >= deadline)); then
            print_logs "$dir"
            die "node not idle after ${START_TIMEOUT_S}s (sinfo: $(sinfo -h -o '%N %t' 2>&1));" \
                "daemons may be left running: $0 stop $dir"
        fi
        sleep 0.2
    done
    echo "Slurm up in $dir: source $dir/env.sh"
}

# Whether process PID runs as NAME (an exited daemon stays a zombie until init reaps it).
running() {
    local pid=$1 name=$2
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] \
        && [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) != Z ]]
}

stop() {
    local dir deadline jobs daemon pid
    dir=$(cd "$1" && pwd) || die "no cluster directory $1"
    export SLURM_CONF=$dir/slurm.conf

    # Job processes outlive a killed slurmd, so cancel every job and wait for them first.
    if running "$(cat "$dir/run/slurmctld.pid" 2>/dev/null)" slurmctld \
        && jobs=$(squeue -h -o %i) && [[ -n $jobs ]]; then
        # shellcheck disable=SC2086  # one id per word
        scancel $jobs
        deadline=$((SECONDS + STOP_TIMEOUT_S))
        while [[ -n $(squeue -h -o %i) ]]; do
            ((SECONDS < deadline)) || die "jobs still in squeue after ${STOP_TIMEOUT_S}s: $(squeue 2>&1)"
            sleep 0.2
        done
    fi

    for daemon in "${DAEMONS[@]}"; do
        pid=$(cat "$dir/run/$daemon.pid" 2>/dev/null) || continue
        # A stale pid file may name a reused pid: only signal the daemon itself.
        running "$pid" "$daemon" && kill "$pid"
        deadline=$((SECONDS + STOP_TIMEOUT_S))
        while running "$pid" "$daemon"; do
            ((SECONDS < deadline)) || die "$daemon (pid $pid) still running after ${STOP_TIMEOUT_S}s"
            sleep 0.1
        done
        rm -f "$dir/run/$daemon.pid"
    done
    echo "Slurm stopped in $dir"
}

case "${1:-}" in
    install) install ;;
    start | stop)
        [[ $# -eq 2 ]] || die "usage: $0 $1 DIR"
        "$1" "$2"
        ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac

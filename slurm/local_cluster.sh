#!/usr/bin/env bash
# A one-machine Slurm cluster for trying the sbatch scripts and for tests/test_slurm.py: this host is the controller
# and the one compute node, with all its CPUs. Needs root and the Debian packages (apt-get install slurm-wlm munge).
#
#   slurm/local_cluster.sh start [DIR]   # writes DIR/slurm.conf, starts munged, slurmctld and slurmd, waits until
#                                        # the node is idle, prints the line to export
#   export SLURM_CONF=DIR/slurm.conf     # then sbatch, srun, squeue, scancel, ... talk to it
#   slurm/local_cluster.sh stop [DIR]    # kills the jobs still there, stops the daemons
#
# DIR (default ${TMPDIR:-/tmp}/kcenter-slurm) holds everything: configuration, munge key and socket, state, logs
# (slurmctld.log, slurmd.log, munged.log). Nothing under /etc is touched and the ports are chosen free at start, so
# the cluster can run beside a real Slurm installation. Processes are tracked by proctrack/linuxproc (the process
# tree; it needs neither cgroups, which containers often lack, nor a cgroup.conf) and are not bound to CPUs
# (task/none). Like the proctrack/cgroup of production clusters, linuxproc signals every process a job step started,
# also those that left the step's session (torchrun starts its workers in sessions of their own): a signal to the
# step reaches the training processes. proctrack/pgid reaches only torchrun, and a scancelled job's workers live on.
set -euo pipefail

command=${1:-}
dir=${2:-${TMPDIR:-/tmp}/kcenter-slurm}
host=$(hostname -s)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

free_ports() {  # two different TCP ports nothing listens on now
    python3 -c 'import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))'
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds, or fail after SECONDS
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "$what did not happen within the deadline; logs in $dir"
        sleep 0.2
    done
}

node_idle() { [[ $(sinfo -h -n "$host" -o %t 2>/dev/null) == idle ]]; }

stop_pid_file() {  # TERM the daemon of a pid file and wait until it has exited
    local file=$1 pid
    [[ -f $file ]] || return 0
    pid=$(<"$file")
    if kill "$pid" 2>/dev/null; then
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$file"
}

write_config() {
    mkdir -p "$dir"/{state,spool,munge}
    chmod 755 "$dir/munge"  # the socket is for every user; the key in it is root's alone
    [[ -f $dir/munge/munge.key ]] || mungekey --create --keyfile="$dir/munge/munge.key"
    chmod 600 "$dir/munge/munge.key"
    local ports
    read -r -a ports < <(free_ports)
    cat >"$dir/slurm.conf" <<EOF
# Written by slurm/local_cluster.sh: one node, this host, all its CPUs.
ClusterName=kcenter-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null ||
        die "slurm-wlm is not installed: apt-get install slurm-wlm munge"
    ((EUID == 0)) || die "needs root (slurmd starts job steps as their users)"
    [[ -f $dir/slurmctld.pid ]] && kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null &&
        die "a cluster is already running from $dir (stop it first: $0 stop $dir)"
    write_config
    export SLURM_CONF=$dir/slurm.conf
    munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"
    slurmctld -c -i   # -c: no jobs from an earlier run of the cluster
    slurmd -N "$host"
    wait_for 60 "node $host idle in sinfo" node_idle
    echo "export SLURM_CONF=$SLURM_CONF"
}

cancel_jobs() {  # kill every job (a step whose processes ignore SIGTERM would otherwise outlive slurmd)
    export SLURM_CONF=$dir/slurm.conf
    local jobs
    jobs=$(squeue -h -o %A 2>/dev/null) || return 0
    [[ -n $jobs ]] || return 0
    # shellcheck disable=SC2086  # one job id per word
    scancel --full --signal=KILL $jobs 2>/dev/null || true
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    wait_for 60 "the end of jobs $jobs" no_jobs
}

no_jobs() { [[ -z $(squeue -h -o %A) ]]; }

stop() {
    [[ -d $dir ]] || return 0
    [[ -f $dir/slurmctld.pid ]] && kill -0 "$(<"$dir/slurmctld.pid")" 2>/dev/null && cancel_jobs
    stop_pid_file "$dir/slurmd.pid"
    stop_pid_file "$dir/slurmctld.pid"
    stop_pid_file "$dir/munge/munged.pid"
}

case $command in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop [DIR]" ;;
esac

#!/usr/bin/env bash
# A throwaway one-node Slurm (munged + slurmctld + slurmd on this host) for tests/test_launch.py.
#
#   tests/slurm_local.sh start DIR    # writes DIR/slurm.conf, starts the daemons, waits for the node
#   tests/slurm_local.sh stop DIR     # stops what `start DIR` started
#
# Everything (config, keys, sockets, logs, state) lives in DIR; nothing under /etc is touched.
# Client commands need SLURM_CONF=DIR/slurm.conf. Needs the Debian packages slurm-wlm and munge,
# and root (slurmd starts job steps as the submitting user).
set -euo pipefail

die() { echo "slurm_local: $*" >&2; exit 1; }
[[ $# -eq 2 ]] || die "usage: $0 start|stop DIR"
action=$1
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$DIR/slurm.conf

stop() {
    local pidfile
    for pidfile in "$DIR"/slurmd.pid "$DIR"/slurmctld.pid "$DIR"/munged.pid; do
        [[ -f $pidfile ]] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
}

case $action in
stop) stop; exit 0 ;;
start) ;;
*) die "unknown action '$action' (start or stop)" ;;
esac

for exe in munged slurmctld slurmd sinfo; do
    command -v "$exe" >/dev/null 2>&1 || die "$exe not found (apt-get install slurm-wlm munge)"
done
[[ $(id -u) == 0 ]] || die "needs root (slurmd runs job steps as the submitting user)"

host=$(hostname -s)
cpus=${SLURM_LOCAL_CPUS:-4}
ctld_port=${SLURM_LOCAL_PORT:-16817}
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/munge"
chmod 700 "$DIR/munge"

if [[ ! -f $DIR/munge/munge.key ]]; then
    head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
    chmod 400 "$DIR/munge/munge.key"
fi
munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" --seed-file="$DIR/munge/munge.seed" \
    || die "munged did not start; see $DIR/munged.log"

cat > "$conf" <<CONF
ClusterName=climseg-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmctldPort=$ctld_port
SlurmdPort=$((ctld_port + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF

export SLURM_CONF=$conf
slurmctld -f "$conf" || { stop; die "slurmctld did not start; see $DIR/slurmctld.log"; }
slurmd -f "$conf" || { stop; die "slurmd did not start; see $DIR/slurmd.log"; }

for _ in $(seq 300); do   # a bound only a broken Slurm reaches
    state=$(sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true)
    [[ $state == idle* || $state == mix* ]] && exit 0
    sleep 1
done
stop
die "node never became idle (state: '${state:-none}'); see $DIR/slurmctld.log and $DIR/slurmd.log"

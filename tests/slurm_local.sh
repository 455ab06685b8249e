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

source "$(dirname "${BASH_SOURCE[0]}")/slurm_lib.sh"

stop() {
    local pidfile
    for pidfile in "$DIR"/slurmd*.pid "$DIR"/slurmctld.pid "$DIR"/munged.pid; do
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
mkdir -p "$DIR/state" "$DIR/spool"
start_munge || die "munged did not start; see $DIR/munged.log"
write_conf climseg-test "$host" "$ctld_port" "$DIR/spool"
echo "NodeName=$host CPUs=$cpus State=UNKNOWN" >> "$conf"

export SLURM_CONF=$conf
slurmctld -f "$conf" || { stop; die "slurmctld did not start; see $DIR/slurmctld.log"; }
slurmd -f "$conf" || { stop; die "slurmd did not start; see $DIR/slurmd$host.log"; }

wait_idle 1 && exit 0
stop
die "node never became idle; see $DIR/slurmctld.log and $DIR/slurmd$host.log"

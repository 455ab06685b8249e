#!/usr/bin/env bash
# A throwaway two-node Slurm on this one Linux host for tests/test_cluster.py, built from
# namespaces (no containers): node1 and node2 each have their own hostname, address on a bridge,
# /etc/hosts, boot_id, node-local scratch and /dev/shm. slurmctld and one slurmd run on node1,
# a slurmd on node2; the root namespace is the login node.
#
#   tests/cluster.sh start DIR          # writes DIR/slurm.conf, starts it all, waits for the nodes
#   tests/cluster.sh stop DIR           # ends jobs, daemons, namespaces by PID; removes the links
#   tests/cluster.sh on 1|2 DIR CMD...  # runs CMD on node 1 or 2 (its net, UTS, mount namespaces)
#
# Clients (sinfo, srun, sbatch) run on the login node with SLURM_CONF=DIR/slurm.conf. DIR and the
# rest of the file system are shared, like a cluster's shared file system; CLUSTER_SCRATCH
# (default DIR/scratch) and /dev/shm are each node's own tmpfs. /tmp, PIDs and CPUs are shared.
# tests/cluster_bin/ssh lets horovodrun start ranks "on" the nodes.
#
# Settings: CLUSTER_PREFIX (names of the namespaces and links, "cs"), CLUSTER_NET (first three
# octets of the bridge's /24, 10.77.0), CLUSTER_CPUS (per node, 2). Two clusters on one host need
# different prefixes and nets; stop reads the ones start used from DIR. Needs root, iproute2,
# util-linux, slurm-wlm and munge; writes nothing under /etc.
set -euo pipefail

die() { echo "cluster: $*" >&2; exit 1; }
[[ $# -ge 2 ]] || die "usage: $0 start|stop DIR  |  $0 on 1|2 DIR CMD..."
action=$1
if [[ $action == on ]]; then
    [[ $# -ge 4 && $2 =~ ^[12]$ ]] || die "usage: $0 on 1|2 DIR CMD..."
    node=$2 DIR=$3
    shift 3
    exec nsenter -t "$(cat "$DIR/node$node.holder.pid")" --net --uts --mount --wd="$PWD" "$@"
fi
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
conf=$DIR/slurm.conf
# start records the names it made, so that stop removes those whatever its own environment says
if [[ $action == stop && -f $DIR/names ]]; then
    read -r CLUSTER_PREFIX CLUSTER_NET < "$DIR/names"
fi
px=${CLUSTER_PREFIX:-cs}
net=${CLUSTER_NET:-10.77.0}
cpus=${CLUSTER_CPUS:-2}
scratch=${CLUSTER_SCRATCH:-$DIR/scratch}
source "$(dirname "${BASH_SOURCE[0]}")/slurm_lib.sh"

# kill_wait PID...: SIGTERM, up to KILL_WAIT (10) s for them to end, then SIGKILL.
kill_wait() {
    local pid alive
    for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
    for _ in $(seq $((${KILL_WAIT:-10} * 5))); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.2
    done
    for pid in "$@"; do kill -9 "$pid" 2>/dev/null || true; done
}

stop() {
    local i pids=() jobs
    # Jobs first: their steps end and the waiting srun/sbatch clients return.
    if [[ -f $DIR/slurmctld.pid ]] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        jobs=$(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            SLURM_CONF=$conf scancel $jobs 2>/dev/null || true
            for _ in $(seq 30); do
                [[ -z $(SLURM_CONF=$conf squeue -h -o %i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    for i in "$DIR"/slurmd*.pid "$DIR"/slurmctld.pid; do [[ -f $i ]] && pids+=("$(cat "$i")"); done
    ((${#pids[@]})) && kill_wait "${pids[@]}"
    for i in 1 2; do
        if ip netns list | grep -qw "${px}node$i"; then
            # What is left in the node's netns (a slurmstepd ignores SIGTERM, its tasks): by PID.
            pids=($(ip netns pids "${px}node$i" 2>/dev/null || true))
            ((${#pids[@]})) && KILL_WAIT=2 kill_wait "${pids[@]}"
            ip netns del "${px}node$i" 2>/dev/null || true
        fi
        # The holder keeps the node's UTS and mount namespaces (and so its tmpfs) alive.
        [[ -f $DIR/node$i.holder.pid ]] && kill_wait "$(cat "$DIR/node$i.holder.pid")"
        rm -f "$DIR/node$i.holder.pid"
        ip link del "${px}v$i" 2>/dev/null || true
    done
    ip link del "${px}br0" 2>/dev/null || true
    rmdir "$DIR"/.cgroup? 2>/dev/null || true
    [[ -f $DIR/munged.pid ]] && kill_wait "$(cat "$DIR/munged.pid")"
    rm -f "$DIR"/slurmd*.pid "$DIR"/slurmctld.pid "$DIR"/munged.pid
}

case $action in
stop) stop; exit 0 ;;
start) ;;
*) die "unknown action '$action' (start, stop or on)" ;;
esac

for exe in munged slurmctld slurmd sinfo ip unshare nsenter; do
    command -v "$exe" >/dev/null 2>&1 ||
        die "$exe not found (apt-get install slurm-wlm munge iproute2 util-linux)"
done
[[ $(id -u) == 0 ]] || die "needs root (namespaces; slurmd runs job steps as the submitting user)"
ip netns list | grep -qw "${px}node1" && die "namespace ${px}node1 exists: stop that cluster first"
mkdir -p "$DIR/state" "$DIR/spool/node1" "$DIR/spool/node2" "$scratch"
echo "$px $net" > "$DIR/names"
trap stop ERR
# One munged in the root namespace serves both nodes: its socket is a file in DIR.
start_munge || die "munged did not start; see $DIR/munged.log"

printf '127.0.0.1 localhost\n%s.1 node1\n%s.2 node2\n%s.254 %s login\n' \
    "$net" "$net" "$net" "$(hostname -s)" > "$DIR/hosts"
ip link add "${px}br0" type bridge
ip addr add "$net.254/24" dev "${px}br0"
ip link set "${px}br0" up
for i in 1 2; do
    ns=${px}node$i
    ip netns add "$ns"
    ip link add "${px}v$i" type veth peer name eth0 netns "$ns"
    ip link set "${px}v$i" master "${px}br0" up
    ip -n "$ns" addr add "$net.$i/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    # The holder: a sleep in the node's own UTS and (private) mount namespaces. Why each mount:
    # - a sysfs of the node's netns, as `ip netns exec` makes, with the host's cgroup tree moved
    #   back under it: without it slurmd stops with "No filesystem mounted on /sys/fs/cgroup";
    # - DIR/hosts over /etc/hosts: the node names resolve on the nodes only;
    # - a boot_id per node: MPI/UCX and NCCL take equal boot_ids for one machine and would talk
    #   through shared memory instead of the network;
    # - tmpfs on the scratch folder and /dev/shm: node-local storage.
    mkdir -p "$DIR/.cgroup$i"
    cat /proc/sys/kernel/random/uuid > "$DIR/node$i.boot_id"
    setsid unshare --uts --mount --propagation private sh -c "
        set -e
        hostname node$i
        mount --rbind /sys/fs/cgroup '$DIR/.cgroup$i'
        exec nsenter --net=/run/netns/$ns sh -c \"
            set -e
            umount -l /sys
            mount -t sysfs node$i-sysfs /sys
            mount --move '$DIR/.cgroup$i' /sys/fs/cgroup
            mount --bind '$DIR/hosts' /etc/hosts
            mount --bind '$DIR/node$i.boot_id' /proc/sys/kernel/random/boot_id
            mount -t tmpfs -o size=2g,mode=1777 node$i-scratch '$scratch'
            mount -t tmpfs -o size=1g,mode=1777 node$i-shm /dev/shm
            echo \\\$\\\$ > '$DIR/node$i.holder.pid.tmp'
            exec sleep infinity\"" </dev/null >"$DIR/node$i.holder.log" 2>&1 &
done
for i in 1 2; do
    for _ in $(seq 50); do [[ -f $DIR/node$i.holder.pid.tmp ]] && break; sleep 0.1; done
    [[ -f $DIR/node$i.holder.pid.tmp ]] ||
        die "node$i did not come up: $(cat "$DIR/node$i.holder.log")"
    mv "$DIR/node$i.holder.pid.tmp" "$DIR/node$i.holder.pid"
done

# Port 6817 in every netns: the namespaces are the test's own, so no port is taken there.
write_conf climseg-cluster "node1($net.1)" 6817 "$DIR/spool/%n"
# CPUs=2 per node: with more, srun -N2 -n4 puts 3 tasks on one node and 1 on the other.
for i in 1 2; do
    echo "NodeName=node$i NodeAddr=$net.$i CPUs=$cpus State=UNKNOWN" >> "$conf"
done
on() { local i=$1; shift; nsenter -t "$(cat "$DIR/node$i.holder.pid")" --net --uts --mount "$@"; }
on 1 slurmctld -f "$conf" || die "slurmctld did not start; see $DIR/slurmctld.log"
for i in 1 2; do
    on "$i" slurmd -f "$conf" -N "node$i" ||
        die "slurmd of node$i did not start; see $DIR/slurmdnode$i.log"
done
trap - ERR
wait_idle 2 && exit 0
stop
die "the nodes never became idle; see $DIR/slurmctld.log and $DIR/slurmdnode?.log"

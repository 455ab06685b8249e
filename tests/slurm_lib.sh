# Shared by tests/slurm_local.sh (one node) and tests/cluster.sh (two): munged, the common part
# of slurm.conf, and the wait for the nodes. Sourced, not run; expects DIR and conf to be set.

# munged with every path in DIR (its key, socket, pid and seed), so nothing under /etc is needed.
start_munge() {
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    if [[ ! -f $DIR/munge/munge.key ]]; then
        head -c 1024 /dev/urandom > "$DIR/munge/munge.key"
        chmod 400 "$DIR/munge/munge.key"
    fi
    munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
        --pid-file="$DIR/munged.pid" --log-file="$DIR/munged.log" \
        --seed-file="$DIR/munge/munge.seed"
}

# write_conf NAME CTLD_HOST PORT SPOOL: the settings both set-ups share. The caller appends its
# NodeName lines. No cgroups, accounting or task binding: the tests need none and a container
# may not allow them.
write_conf() {
    cat > "$conf" <<CONF
ClusterName=$1
SlurmctldHost=$2
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
SlurmctldPort=$3
SlurmdPort=$(($3 + 1))
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$4
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd%n.log
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
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

# wait_idle N: until sinfo shows N nodes idle (or mixed); 1 after 300 s, a bound only a broken
# Slurm reaches.
wait_idle() {
    local up
    for _ in $(seq 300); do
        up=$(SLURM_CONF=$conf sinfo -h -N -o '%t' 2>/dev/null | grep -cE '^(idle|mix)' || true)
        ((up >= $1)) && return 0
        sleep 1
    done
    return 1
}

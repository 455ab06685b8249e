#!/usr/bin/env bash
# Train with Horovod elastic: a rank (or node) that dies makes the others roll back to the last
# commit and go on with fewer ranks; a host that comes back joins again (docs/elastic.md).
#
#   source .venv/bin/activate
#   DATA=/shared/cam HOSTS="node1:4 node2:4" MIN_NP=4 jobs/elastic.sh [config overrides]
#
# Settings (environment, with defaults):
#   DATA        the prepared data set, every file readable on every host            required
#               (a shared file system, or the whole split on each node: climseg stage --per-node)
#   HOSTS       "host:slots ..." the job may use                 in a Slurm allocation: its
#               nodes x GPUS_PER_NODE (4); else required
#   NP          ranks to start with                               all the slots of HOSTS
#   MIN_NP      fewest ranks to go on with                                              1
#   CONFIG      training config; must set train.global_batch_size  yaml/workstation.yaml
#   OUTPUT      run folder (checkpoints, TensorBoard, discover-hosts.sh)       runs/elastic
#   HOROVODRUN_ARGS  extra horovodrun options, e.g. --network-interfaces ib0
#                    --blacklist-cooldown-range 60 120 (let a failed host back)    (none)
# The host list is read by OUTPUT/discover-hosts.sh, which prints HOSTS_FILE (OUTPUT/hosts):
# edit that file while the job runs to add or remove hosts. Horovod blacklists a whole host
# when one of its ranks fails, so every rank of that host leaves with it.
set -euo pipefail

: "${DATA:?set DATA to the prepared data set folder (readable on every host)}"
[[ -d $DATA ]] || { echo "elastic.sh: DATA=$DATA is not a folder" >&2; exit 2; }
if [[ -z ${HOSTS:-} && -n ${SLURM_JOB_NODELIST:-} ]]; then
    HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/:${GPUS_PER_NODE:-4}/" | tr '\n' ' ')
fi
: "${HOSTS:?set HOSTS to the hosts and slots the job may use, e.g. HOSTS=\"node1:4 node2:4\"}"
SLOTS=0
for entry in $HOSTS; do
    [[ $entry =~ ^[^:[:space:]]+:[1-9][0-9]*$ ]] || {
        echo "elastic.sh: HOSTS entry '$entry' is not host:slots" >&2; exit 2; }
    SLOTS=$((SLOTS + ${entry##*:}))
done
NP=${NP:-$SLOTS}
MIN_NP=${MIN_NP:-1}
for name in NP MIN_NP; do
    [[ ${!name} =~ ^[1-9][0-9]*$ ]] || { echo "elastic.sh: $name=${!name} is not a positive number" >&2; exit 2; }
done
(( MIN_NP <= NP && NP <= SLOTS )) || {
    echo "elastic.sh: need MIN_NP ($MIN_NP) <= NP ($NP) <= the slots of HOSTS ($SLOTS)" >&2; exit 2; }
CONFIG=${CONFIG:-yaml/workstation.yaml}
[[ -f $CONFIG ]] || { echo "elastic.sh: CONFIG=$CONFIG not found" >&2; exit 2; }
OUTPUT=${OUTPUT:-runs/elastic}

mkdir -p "$OUTPUT"
HOSTS_FILE=$(realpath "$OUTPUT")/hosts
tr ' ' '\n' <<<"$HOSTS" | grep -v '^$' >"$HOSTS_FILE"
DISCOVER=$(realpath "$OUTPUT")/discover-hosts.sh
printf '#!/bin/sh\n# Hosts for horovodrun --host-discovery-script: edit %s to change them.\ncat %q\n' \
    "$HOSTS_FILE" "$HOSTS_FILE" >"$DISCOVER"
chmod +x "$DISCOVER"

echo "elastic.sh: $NP ranks (at least $MIN_NP, at most $SLOTS) on: $HOSTS" >&2
# shellcheck disable=SC2086
# Ctrl-C or SIGTERM to horovodrun: the ranks get this long to stop at a step boundary and save
# (climseg's Horovod build, tools/patch_horovod.py); a second signal kills them at once.
export HOROVOD_GRACEFUL_TERMINATION_TIME_S=${HOROVOD_GRACEFUL_TERMINATION_TIME_S:-120}
exec horovodrun -np "$NP" --min-np "$MIN_NP" --max-np "$SLOTS" --host-discovery-script "$DISCOVER" \
    --gloo ${HOROVODRUN_ARGS:-} \
    python -m climseg.train --config "$CONFIG" data.root="$DATA" output_dir="$OUTPUT" \
    train.elastic=true resume=auto "$@"

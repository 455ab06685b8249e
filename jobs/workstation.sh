#!/usr/bin/env bash
# Train on one machine, one rank per GPU: stage the data set to local disk, then train.
#
#   source .venv/bin/activate
#   DATA=/path/to/cam NGPUS=4 jobs/workstation.sh [config overrides, e.g. train.max_epochs=8]
#
# Settings (environment, with defaults):
#   DATA        the prepared data set (the split_data.py output, with stats.h5)     required
#   NGPUS       ranks; one per GPU               number of GPUs nvidia-smi lists, else 2
#   CONFIG      training config                                    yaml/workstation.yaml
#   STAGE_DIR   local copy the ranks read from          ${TMPDIR:-/tmp}/climseg-staged
#   STAGE       1: stage DATA to STAGE_DIR first; 0: train straight from DATA         1
#   OUTPUT      run folder (checkpoints, TensorBoard)                runs/workstation
#   ENGINE      horovod (horovodrun) or torch (torchrun, torch.distributed; no Horovod
#               needed: docs/engines.md)                                          horovod
#   HOROVOD_CONTROLLER  gloo or mpi: how horovodrun starts the ranks                 gloo
#   HOROVODRUN_ARGS  extra horovodrun options                                    (none)
# Each rank uses the GPU of its local rank (the trainer binds cuda:<local_rank>).
# The Gloo controller is built by every `make install` (horovodrun's MPI mode does not
# recognise the PyPI MPICH it installs); it only starts the ranks and coordinates them:
# on GPUs the gradient allreduce still goes through NCCL.
set -euo pipefail

: "${DATA:?set DATA to the prepared data set folder (the split_data.py output)}"
[[ -d $DATA ]] || { echo "workstation.sh: DATA=$DATA is not a folder" >&2; exit 2; }
if [[ -z ${NGPUS:-} ]]; then
    NGPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $NGPUS -gt 0 ]] || NGPUS=2
fi
[[ $NGPUS =~ ^[1-9][0-9]*$ ]] || { echo "workstation.sh: NGPUS=$NGPUS is not a positive number" >&2; exit 2; }
CONFIG=${CONFIG:-yaml/workstation.yaml}
[[ -f $CONFIG ]] || { echo "workstation.sh: CONFIG=$CONFIG not found" >&2; exit 2; }
STAGE_DIR=${STAGE_DIR:-${TMPDIR:-/tmp}/climseg-staged}
STAGE=${STAGE:-1}
OUTPUT=${OUTPUT:-runs/workstation}
HOROVOD_CONTROLLER=${HOROVOD_CONTROLLER:-gloo}
[[ $HOROVOD_CONTROLLER == gloo || $HOROVOD_CONTROLLER == mpi ]] || {
    echo "workstation.sh: HOROVOD_CONTROLLER=$HOROVOD_CONTROLLER: expected gloo or mpi" >&2; exit 2; }
ENGINE=${ENGINE:-horovod}
# LAUNCH runs a Python module on every rank: LAUNCH+(climseg stage ...).
case $ENGINE in
    horovod)
        # shellcheck disable=SC2206
        LAUNCH=(horovodrun -np "$NGPUS" -H "localhost:$NGPUS" "--$HOROVOD_CONTROLLER"
                ${HOROVODRUN_ARGS:-} python -m) ;;
    torch)
        LAUNCH=(python -m torch.distributed.run --standalone --nproc_per_node "$NGPUS" -m) ;;
    *)
        echo "workstation.sh: ENGINE=$ENGINE: expected horovod or torch" >&2; exit 2 ;;
esac

root=$DATA
if [[ $STAGE == 1 ]]; then
    "${LAUNCH[@]}" climseg stage --data "$DATA" --output "$STAGE_DIR" \
        --splits train validation
    root=$STAGE_DIR
fi

# climseg's Horovod build (tools/patch_horovod.py) gives its ranks HOROVOD_GRACEFUL_TERMINATION_TIME_S
# after a signal to horovodrun (Horovod's own is 5 s: too short for a checkpoint); torchrun
# gives 30 s. Rather than rely on either, the launcher runs in its own session, out of reach of
# the terminal's Ctrl-C, and SIGINT/SIGTERM/SIGUSR1 to this script are passed to the ranks as
# SIGUSR1: they finish their step, rank 0 writes a checkpoint, they exit 3 (resume=auto goes
# on). A second signal stops the launcher at once.
export HOROVOD_GRACEFUL_TERMINATION_TIME_S=${HOROVOD_GRACEFUL_TERMINATION_TIME_S:-120}
setsid "${LAUNCH[@]}" climseg.train --config "$CONFIG" --engine "$ENGINE" \
    data.root="$root" output_dir="$OUTPUT" "$@" &
launcher=$!
asked=0
stop_ranks() {
    if (( asked )); then
        echo "workstation.sh: stopping $ENGINE's launcher now (no checkpoint)" >&2
        # Twice: the first asks the launcher to stop its ranks within the grace period, the
        # second (horovodrun patched by tools/patch_horovod.py) kills them at once.
        kill -TERM "$launcher" 2>/dev/null || true
        sleep 0.2
        kill -TERM "$launcher" 2>/dev/null || true
        return
    fi
    asked=1
    echo "workstation.sh: asking the ranks to stop after their step, with a checkpoint" >&2
    # The ranks, not the launcher: a process whose program is python [-u] -m climseg.train
    # (torchrun starts its workers with -u).
    pkill -USR1 -f "^[^ ]*python[^ ]*( -u)? -m climseg.train .*output_dir=$OUTPUT( |\$)" || true
}
trap stop_ranks INT TERM USR1
status=0
while :; do
    wait "$launcher" && status=0 || status=$?
    kill -0 "$launcher" 2>/dev/null || break  # wait was only interrupted by a signal
done
if (( asked && status != 0 )); then
    echo "workstation.sh: stopped on request (launcher status $status; the ranks' lines above" \
         "name the checkpoint); run again with resume=auto to go on" >&2
    exit 3
fi
exit "$status"

#!/usr/bin/env bash
# The GPU check (the body of `make test-gpu`): on a GPU node with this repository, in one go,
#   1. build Horovod with NCCL (tools/install_horovod.sh; offline from carried files),
#   2. run the CUDA tests (tests/test_cuda.py),
#   3. time the step, LAMB, the loader and the trainer at full size (768x1152, batch 8, bf16),
# and print one table with the issue's targets next to the figures. Sized for one 10-minute
# call: phases that would start after GPU_CHECK_BUDGET_S are skipped, and the table says so.
#
#   tools/gpu_check.sh               # on the GPU node
#   tools/gpu_check.sh --dry-run     # print what it would run, run nothing
#   tools/gpu_check.sh --cpu-smoke   # the whole sequence at tiny sizes on a CPU machine (no
#                                    # Horovod build: its dry run), to check the plumbing
#
# Settings (environment):
#   PYTHON              interpreter with torch (default: .venv/bin/python if present, else python3)
#   CLIMSEG_CARRY       folder with horovod-0.28.1.tar.gz and the cffi/pycparser wheels, for a
#                       node without a package index (default: <repo>/.cache/carry)
#   GPU_CHECK_DATA      where the synthetic full-size samples go (default: /dev/shm/climseg-gpu-check)
#   GPU_CHECK_SAMPLES   how many (default 160: 9 GB; 128 train samples = 16 steps per epoch)
#   GPU_CHECK_OUT       results folder (default: $OUT when set, else <repo>/runs/gpu-check)
#   GPU_CHECK_BUDGET_S  no phase starts that would end after this many seconds (default 560)
#   GPU_CHECK_COMPILE   1: also time the torch.compile'd step, if the budget allows (default 1)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
MODE=gpu
case ${1:-} in
    "") ;;
    --dry-run) MODE=dry ;;
    --cpu-smoke) MODE=smoke ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_check: error: unknown argument '$1' (--dry-run, --cpu-smoke)" >&2; exit 2 ;;
esac

if [[ -z ${PYTHON:-} ]]; then
    if [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
CARRY=${CLIMSEG_CARRY:-$ROOT/.cache/carry}
DATA=${GPU_CHECK_DATA:-/dev/shm/climseg-gpu-check}
SAMPLES=${GPU_CHECK_SAMPLES:-160}
RESULTS=${GPU_CHECK_OUT:-${OUT:-$ROOT/runs/gpu-check}}
BUDGET=${GPU_CHECK_BUDGET_S:-560}
COMPILE=${GPU_CHECK_COMPILE:-1}
for setting in SAMPLES BUDGET COMPILE; do
    [[ ${!setting} =~ ^[0-9]+$ ]] || { echo "gpu_check: error: ${setting}=${!setting}: expected a whole number" >&2; exit 2; }
done

# Sizes: the issue's (full samples, batch 8, bf16) on the GPU (and in the dry run's plan);
# seconds-long ones for the smoke run.
if [[ $MODE == smoke ]]; then
    HEIGHT=64 WIDTH=96 BATCH=2 SAMPLES=20 DEVICE=cpu PRECISION=fp32 COMPILE=0
    DATA=${GPU_CHECK_DATA:-$RESULTS/data}
    STEP_ARGS=(--steps 2 --warmup 1) LOADER_ARGS=(--steps 2 --warmup 1 --threads 2 --ref-workers 1)
    TRAIN_ARGS=(--steps 2 --warmup 1) KERNEL_STEPS=1 THREADS=2
else
    HEIGHT=768 WIDTH=1152 BATCH=8 DEVICE=cuda PRECISION=bf16
    STEP_ARGS=(--steps 20 --warmup 5) LOADER_ARGS=(--steps 12 --warmup 4 --threads 8 16 --ref-workers 8)
    TRAIN_ARGS=(--steps 10 --warmup 3) KERNEL_STEPS=10 THREADS=$(nproc)
fi

START=$SECONDS
LOG=$RESULTS/gpu_check.log
say() { echo "gpu_check [$((SECONDS - START))s]: $*" >&2; }
die() { echo "gpu_check: error: $*" >&2; exit 1; }
SKIPPED=() FAILED=()
# run NAME CMD...: one phase, its output also in the log. A phase that fails is listed and the
# next ones still run (each measures something else). A phase that would end past the budget
# (NEED=seconds it takes at most, default 30) is skipped.
run() {
    local name=$1; shift
    if (( SECONDS - START + ${NEED:-30} > BUDGET )); then
        say "skipping $name: it would end past the ${BUDGET}s budget"
        SKIPPED+=("$name")
        return 0
    fi
    say "$name: $*"
    if [[ $MODE == dry ]]; then return 0; fi
    # Nor may a phase that hangs (a collective, a compile) run past the budget.
    if ! timeout -k 10 $((BUDGET - (SECONDS - START))) "$@" 2>&1 | tee -a "$LOG" >&2; then
        say "$name FAILED (see $LOG)"
        FAILED+=("$name")
    fi
}

if [[ $MODE != dry ]]; then
    mkdir -p "$RESULTS"
    : > "$LOG"
    command -v "$PYTHON" >/dev/null 2>&1 || die "python '$PYTHON' not found (set PYTHON=...)"
    "$PYTHON" -c 'import torch, h5py, numpy, yaml' 2>/dev/null \
        || die "$PYTHON lacks torch, h5py, numpy or yaml (make install, or the node's Python)"
    if [[ $MODE == gpu ]]; then
        "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
            || die "no GPU visible to torch ($PYTHON); --cpu-smoke checks the sequence on a CPU"
    fi
fi
say "mode $MODE, python $PYTHON, results in $RESULTS, data in $DATA, budget ${BUDGET}s"

# --- 1. Horovod with NCCL ---------------------------------------------------------------------
# On a node without a package index, the build's missing Python dependencies come from the
# carried wheels, and the source from the carried archive.
if [[ $MODE != smoke ]]; then
    if [[ -d $CARRY ]]; then
        missing=$("$PYTHON" -c '
import importlib.util
print(" ".join(m for m in ("cffi", "pycparser") if importlib.util.find_spec(m) is None))')
        if [[ -n $missing ]]; then
            # shellcheck disable=SC2086
            run "carried wheels" "$PYTHON" -m pip install -q --no-index --find-links "$CARRY" $missing
        fi
        sdist=$(ls "$CARRY"/horovod-0.28.1.tar.gz 2>/dev/null || true)
        [[ -n $sdist ]] && export HOROVOD_SDIST=$sdist
    fi
    # MPI is not needed on one node (horovodrun --gloo); leaving it out saves build time.
    export CLIMSEG_HOROVOD_MPI=${CLIMSEG_HOROVOD_MPI:-0} PIP_BREAK_SYSTEM_PACKAGES=1
    NEED=150 run "horovod" env PYTHON="$PYTHON" tools/install_horovod.sh
else
    run "horovod (its dry run)" env PYTHON="$PYTHON" CLIMSEG_HOROVOD_DRY_RUN=1 CLIMSEG_HOROVOD_MPI=0 \
        tools/install_horovod.sh
fi

# --- 2. the CUDA tests ------------------------------------------------------------------------
# CLIMSEG_REQUIRE_HOROVOD: the NCCL test fails rather than skips when the build did not load.
NEED=150 run "cuda tests" env CLIMSEG_REQUIRE_HOROVOD=$([[ $MODE != smoke ]] && echo 1 || echo 0) \
    "$PYTHON" -m pytest -q -rs tests/test_cuda.py --junitxml "$RESULTS/test_cuda.xml"

# --- 3. measurements ----------------------------------------------------------------------------
run "step" "$PYTHON" -m climseg.bench step --device "$DEVICE" --size "$HEIGHT" "$WIDTH" \
    --batch-size "$BATCH" --precision "$PRECISION" --optimizer lamb "${STEP_ARGS[@]}" \
    --json "$RESULTS/step.json"
run "optimizer" "$PYTHON" tools/bench_kernels.py optim --device "$DEVICE" --optimizers lamb adamw \
    --steps "$KERNEL_STEPS" --json "$RESULTS/optim.json"

if [[ $MODE == dry || ! -f $DATA/stats.h5 || $(ls "$DATA"/raw 2>/dev/null | wc -l) -lt $SAMPLES ]]; then
    NEED=60 run "data" bash -c "rm -rf '$DATA' && mkdir -p '$DATA' \
        && '$PYTHON' tools/make_synthetic.py --output '$DATA/raw' --samples $SAMPLES --seed 1 \
             --height $HEIGHT --width $WIDTH --quiet \
        && '$PYTHON' tools/split_data.py --data '$DATA/raw' --output '$DATA/cam' --quiet \
        && '$PYTHON' tools/summarize_data.py --data '$DATA/cam' --quiet \
        && ln -sfn cam/stats.h5 '$DATA/stats.h5'"
fi
NEED=45 run "loader" "$PYTHON" -m climseg.bench loader --device "$DEVICE" --data "$DATA/cam/train" \
    --batch-size "$BATCH" --precision "$PRECISION" --repeats 1 "${LOADER_ARGS[@]}" \
    --json "$RESULTS/loader.json"
NEED=60 run "train" "$PYTHON" -m climseg.bench train --config yaml/workstation.yaml "${TRAIN_ARGS[@]}" \
    --json "$RESULTS/train.json" "data.root=$DATA/cam" "train.local_batch_size=$BATCH" \
    train.gradient_accumulation=1 "train.precision=$PRECISION" \
    "data.loader_threads=$THREADS"
if [[ $COMPILE == 1 ]]; then
    NEED=180 run "compiled step" "$PYTHON" -m climseg.bench step --device "$DEVICE" --size "$HEIGHT" "$WIDTH" \
        --batch-size "$BATCH" --precision "$PRECISION" --optimizer lamb --compile \
        "${STEP_ARGS[@]}" --json "$RESULTS/step_compiled.json"
fi

[[ $MODE == dry ]] && { say "dry run: nothing was run"; exit 0; }

# --- the table ----------------------------------------------------------------------------------
"$PYTHON" tools/gpu_check_report.py "$RESULTS" --skipped ${SKIPPED[@]+"${SKIPPED[@]}"} \
    --failed ${FAILED[@]+"${FAILED[@]}"} | tee "$RESULTS/table.txt"
say "done in $((SECONDS - START))s; results in $RESULTS"
(( ${#FAILED[@]} == 0 ))

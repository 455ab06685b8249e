#!/usr/bin/env bash
# Build Horovod 0.28.1 from source for the installed PyTorch and install it.
#
#   tools/install_horovod.sh            # uses $PYTHON (default: python3 on PATH)
#   PYTHON=.venv/bin/python tools/install_horovod.sh
#
# Horovod's last release (0.28.1, 2023) ships no wheels and does not compile against
# PyTorch >= 2.1 as released; this script applies the fixes from docs we trust
# (C++17, GCC 13 headers, CMake 4 policy) and climseg's launcher patch (a grace period that
# lets a stopped run save: tools/patch_horovod.py), builds a wheel once, caches it, and installs it.
#
# Features, each decided here and recorded in the wheel (horovod/_climseg_build.py):
#   Gloo  always (what `horovodrun --gloo` uses).
#   MPI   when an `mpicxx` is found (PATH, or next to $PYTHON: the PyPI `mpich` package puts
#         one there). Needed for `srun` launches, where Horovod uses its MPI controller.
#         If the MPI build fails with CLIMSEG_HOROVOD_MPI=auto, it falls back to Gloo only.
#   NCCL  when torch was built with CUDA; uses the NCCL of the nvidia-nccl-cu* package torch
#         loads (linked shared), or $HOROVOD_NCCL_HOME, or a system nccl.h.
#
# Settings (environment):
#   PYTHON                     interpreter to install into            (python3)
#   CLIMSEG_HOROVOD_CACHE      source/wheel cache        (<repo>/.cache/horovod)
#   CLIMSEG_HOROVOD_MPI        auto | 1 | 0                            (auto)
#   CLIMSEG_HOROVOD_NCCL       auto | 1 | 0                            (auto)
#   CLIMSEG_HOROVOD_FORCE      1: rebuild even when the installed build matches
#   CLIMSEG_HOROVOD_DRY_RUN    1: print the build settings it would use, build nothing
#   HOROVOD_SDIST              a horovod-0.28.1.tar.gz to use instead of downloading one
#   HOROVOD_NCCL_HOME          NCCL install with include/ and lib/ (overrides detection)
#   HOROVOD_BUILD_CUDA_CC_LIST compute capabilities, e.g. 80,90 (default: the visible GPU, else 80,90)
#   MAKEFLAGS                  build parallelism                       (-j<cores>)
set -euo pipefail

HOROVOD_VERSION=0.28.1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
CACHE=${CLIMSEG_HOROVOD_CACHE:-$ROOT/.cache/horovod}
WANT_MPI=${CLIMSEG_HOROVOD_MPI:-auto}
WANT_NCCL=${CLIMSEG_HOROVOD_NCCL:-auto}

say() { echo "install_horovod: $*" >&2; }
die() { echo "install_horovod: error: $*" >&2; exit 1; }

for setting in WANT_MPI WANT_NCCL; do
    case ${!setting} in auto|0|1) ;; *) die "CLIMSEG_HOROVOD_${setting#WANT_}=${!setting}: expected auto, 1 or 0";; esac
done

# --- what is needed before anything is built --------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (set PYTHON=...)"
# Absolute paths: the build runs in other folders (keep the venv's symlink, do not resolve it).
PYTHON=$(command -v "$PYTHON")
PYBIN=$(cd "$(dirname "$PYTHON")" && pwd)
PYTHON=$PYBIN/$(basename "$PYTHON")
"$PYTHON" -c 'import torch' 2>/dev/null \
    || die "torch is not importable by $PYTHON; install it first (make install does: pip install torch==2.13.0)"

read -r TORCH_VERSION TORCH_CUDA PYTAG < <("$PYTHON" -c '
import sys, torch
print(torch.__version__, torch.version.cuda or "none", "cp%d%d" % sys.version_info[:2])')

missing=$("$PYTHON" - <<'EOF'
import importlib.util
need = {"cffi": "cffi", "psutil": "psutil", "cloudpickle": "cloudpickle", "yaml": "pyyaml",
        "packaging": "packaging", "setuptools": "setuptools", "wheel": "wheel"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [[ -n $missing ]]; then
    say "installing Horovod's build dependencies: $missing"
    # shellcheck disable=SC2086
    "$PYTHON" -m pip install -q $missing || die "cannot install Horovod build dependencies: $missing"
fi

# --- decide the features ------------------------------------------------------------------------
MPICXX=${MPICXX:-}
if [[ -z $MPICXX && $WANT_MPI != 0 ]]; then
    if [[ -x $PYBIN/mpicxx ]]; then MPICXX=$PYBIN/mpicxx
    else MPICXX=$(command -v mpicxx || true)
    fi
fi
if [[ -n $MPICXX ]]; then   # absolute path; a bare name (MPICXX=CC on a Cray) from PATH
    if [[ $MPICXX != */* ]]; then
        found=$(command -v "$MPICXX") || die "MPICXX=$MPICXX: not found on PATH"
        MPICXX=$found
    fi
    [[ -x $MPICXX ]] || die "MPICXX=$MPICXX is not an executable"
    MPICXX=$(cd "$(dirname "$MPICXX")" && pwd)/$(basename "$MPICXX")
fi
if [[ $WANT_MPI == 1 && -z $MPICXX ]]; then
    die "CLIMSEG_HOROVOD_MPI=1 but no mpicxx found (pip install mpich, or apt-get install libopenmpi-dev)"
fi
with_mpi=0; [[ $WANT_MPI != 0 && -n $MPICXX ]] && with_mpi=1
mpi_id=none
if [[ $with_mpi == 1 ]]; then
    mpi_id=$("$MPICXX" -show 2>/dev/null | sha1sum | cut -c1-8) || mpi_id=unknown
    # An earlier MPI build with this very mpicxx failed: go straight to Gloo only.
    if [[ $WANT_MPI == auto && -f $CACHE/mpi-failed-$mpi_id ]]; then
        say "the MPI build with $MPICXX failed before ($CACHE/mpi-failed-$mpi_id); building Gloo only"
        with_mpi=0 mpi_id=none
    fi
fi

with_nccl=0
if [[ $TORCH_CUDA != none && $WANT_NCCL != 0 ]]; then with_nccl=1; fi
if [[ $WANT_NCCL == 1 && $TORCH_CUDA == none ]]; then
    die "CLIMSEG_HOROVOD_NCCL=1 but torch $TORCH_VERSION was built without CUDA"
fi

# The signature names everything the installed build depends on; a change in any of it rebuilds.
# launcher=N: the version of tools/patch_horovod.py's launcher patch; bump it when that changes.
LAUNCHER_PATCH=4
signature="horovod=$HOROVOD_VERSION python=$PYTAG torch=$TORCH_VERSION cuda=$TORCH_CUDA gloo=1 mpi=$with_mpi:$mpi_id nccl=$with_nccl launcher=$LAUNCHER_PATCH"

installed_signature() {
    "$PYTHON" -c 'import horovod._climseg_build as b; print(b.SIGNATURE)' 2>/dev/null || true
}

check_build() {
    # horovodrun lives next to the interpreter in a venv; PATH may not have it.
    local runner=$PYBIN/horovodrun
    [[ -x $runner ]] || runner=$(command -v horovodrun || true)
    [[ -n $runner ]] || die "horovod installed but horovodrun not found next to $PYTHON or on PATH"
    local report
    report=$(PATH=$PYBIN:$PATH "$runner" --check-build) || die "horovodrun --check-build failed"
    echo "$report"
    grep -q '\[X\] PyTorch' <<<"$report" \
        || die "horovod is installed but its PyTorch extension does not load; $PYTHON -c 'import horovod.torch' shows why"
}

if [[ ${CLIMSEG_HOROVOD_FORCE:-0} != 1 && $(installed_signature) == "$signature" ]]; then
    say "Horovod already installed and matching ($signature)"
    # A load test instead of the (slower) horovodrun --check-build that ends every install.
    "$PYTHON" -c '
import horovod.torch as hvd
print("horovod.torch loads: gloo=%d mpi=%d nccl=%s" % (hvd.gloo_built(), hvd.mpi_built(), hvd.nccl_built()))' \
        || die "horovod is installed but 'import horovod.torch' fails (see above); rebuild with CLIMSEG_HOROVOD_FORCE=1"
    exit 0
fi
say "want: $signature"

slug=$(echo "$signature" | sha1sum | cut -c1-12)
WHEELDIR=$CACHE/wheels/$slug

build_env=(
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    HOROVOD_WITH_GLOO=1
    # Fix 2: GCC 13 no longer includes these transitively.
    "CXXFLAGS=${CXXFLAGS:-} -include cstdint -include string -include stdexcept"
    # Fix 3: CMake 4 refuses the bundled gloo's cmake_minimum_required.
    CMAKE_POLICY_VERSION_MINIMUM=3.5
    "MAKEFLAGS=${MAKEFLAGS:--j$(nproc)}"
)

if [[ $with_nccl == 1 ]]; then
    if ! command -v nvcc >/dev/null 2>&1; then
        [[ -x ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc ]] \
            || die "torch has CUDA $TORCH_CUDA but nvcc was not found (set CUDA_HOME, or CLIMSEG_HOROVOD_NCCL=0 for a CPU build)"
        PATH=${CUDA_HOME:-/usr/local/cuda}/bin:$PATH
    fi
    if [[ -z ${HOROVOD_NCCL_HOME:-} ]]; then
        nccl_pkg=$("$PYTHON" -c '
import importlib.util
spec = importlib.util.find_spec("nvidia.nccl")
print(list(spec.submodule_search_locations)[0] if spec else "")' 2>/dev/null || true)
        if [[ -n $nccl_pkg && -f $nccl_pkg/include/nccl.h ]]; then
            # Fix 4: link the NCCL torch uses; the pip package lacks the unversioned libnccl.so
            # link, so build against a shadow folder instead of writing into site-packages.
            libnccl=$(ls "$nccl_pkg"/lib/libnccl.so* 2>/dev/null | head -n1)
            [[ -n $libnccl ]] || die "$nccl_pkg has nccl.h but no lib/libnccl.so*"
            HOROVOD_NCCL_HOME=$CACHE/nccl-home/$slug
            mkdir -p "$HOROVOD_NCCL_HOME/lib"
            ln -sfn "$nccl_pkg/include" "$HOROVOD_NCCL_HOME/include"
            ln -sfn "$libnccl" "$HOROVOD_NCCL_HOME/lib/libnccl.so"
            ln -sfn "$libnccl" "$HOROVOD_NCCL_HOME/lib/libnccl.so.2"
            say "NCCL from the nvidia-nccl package at $nccl_pkg"
        elif [[ -f /usr/include/nccl.h ]]; then
            say "NCCL from the system (/usr/include/nccl.h)"
        else
            die "torch has CUDA $TORCH_CUDA but no NCCL was found (no nvidia-nccl package, no /usr/include/nccl.h); set HOROVOD_NCCL_HOME or CLIMSEG_HOROVOD_NCCL=0"
        fi
    fi
    cc_list=${HOROVOD_BUILD_CUDA_CC_LIST:-$("$PYTHON" -c '
import torch
caps = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
print(",".join(caps))' 2>/dev/null || true)}
    build_env+=(HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED "HOROVOD_BUILD_CUDA_CC_LIST=${cc_list:-80,90}")
    if [[ -n ${HOROVOD_NCCL_HOME:-} ]]; then build_env+=("HOROVOD_NCCL_HOME=$HOROVOD_NCCL_HOME"); fi
fi

if [[ ${CLIMSEG_HOROVOD_DRY_RUN:-0} == 1 ]]; then
    printf '%s\n' "${build_env[@]}"
    if [[ $with_mpi == 1 ]]; then echo "HOROVOD_WITH_MPI=1 (mpicxx: $MPICXX)"; else echo "HOROVOD_WITHOUT_MPI=1"; fi
    say "dry run: nothing built or installed"
    exit 0
fi

install_wheel() {
    local wheel
    wheel=$(ls "$WHEELDIR"/horovod-"$HOROVOD_VERSION"-*.whl 2>/dev/null | head -n1 || true)
    [[ -n $wheel ]] || return 1
    say "installing cached wheel $wheel"
    "$PYTHON" -m pip install -q --no-deps --force-reinstall "$wheel"
}

if install_wheel; then
    [[ $(installed_signature) == "$signature" ]] || die "cached wheel in $WHEELDIR does not carry the signature; delete that folder"
    check_build
    exit 0
fi

# --- build ---------------------------------------------------------------------------------------
command -v cmake >/dev/null 2>&1 || die "cmake not found (apt-get install cmake, or pip install cmake)"
CXX=${CXX:-$(command -v g++ || command -v c++ || true)}
[[ -n $CXX ]] || die "no C++ compiler found (apt-get install g++, or set CXX)"
export CXX
command -v make >/dev/null 2>&1 || die "make not found (apt-get install make)"

mkdir -p "$CACHE/src"
SDIST=${HOROVOD_SDIST:-$CACHE/src/horovod-$HOROVOD_VERSION.tar.gz}
if [[ ! -f $SDIST ]]; then
    say "downloading the horovod $HOROVOD_VERSION source"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$CACHE/src" "horovod==$HOROVOD_VERSION" \
        || die "cannot download horovod==$HOROVOD_VERSION from PyPI (no network? set HOROVOD_SDIST=path/to/horovod-$HOROVOD_VERSION.tar.gz)"
fi
[[ -f $SDIST ]] || die "horovod source archive $SDIST not found"

BUILD=$CACHE/build/$slug
rm -rf "$BUILD"
mkdir -p "$BUILD"
tar -xzf "$SDIST" -C "$BUILD"
SRC=$BUILD/horovod-$HOROVOD_VERSION
[[ -f $SRC/setup.py ]] || die "$SDIST does not unpack to horovod-$HOROVOD_VERSION/setup.py"

# Fix 1: PyTorch 2.x headers need C++17.
for cml in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
    grep -q 'set(CMAKE_CXX_STANDARD 14)' "$cml" || die "$cml: expected 'set(CMAKE_CXX_STANDARD 14)' to patch; is this horovod $HOROVOD_VERSION?"
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$cml"
done
# Fix 5: stopping horovodrun lets the ranks save (a grace period from
# HOROVOD_GRACEFUL_TERMINATION_TIME_S, default 120 s, instead of 5 s; a second signal kills).
"$PYTHON" "$ROOT/tools/patch_horovod.py" "$SRC/horovod" || die "cannot patch the horovod launcher (above)"
# The signature travels in the wheel, so "is the installed build the one we want" is one import.
cat > "$SRC/horovod/_climseg_build.py" <<EOF
"""Written by climseg's tools/install_horovod.sh: what this Horovod build was made for."""
SIGNATURE = "$signature"
EOF

build_wheel() {  # $1: 1 to build with MPI
    local mpi_env=(HOROVOD_WITHOUT_MPI=1)
    local path=$PATH
    if [[ $1 == 1 ]]; then
        mpi_env=(HOROVOD_WITH_MPI=1)
        path=$(dirname "$MPICXX"):$PATH   # CMake's FindMPI looks for mpicxx on PATH
    fi
    local log=$CACHE/build-$slug.log
    say "building the wheel (gloo=1 mpi=$1 nccl=$with_nccl); log: $log"
    mkdir -p "$WHEELDIR"
    rm -rf "$SRC/build"   # a failed attempt's CMake cache would be reused otherwise
    if env "${build_env[@]}" "${mpi_env[@]}" PATH="$path" \
        "$PYTHON" -m pip wheel -v --no-deps --no-build-isolation -w "$WHEELDIR" "$SRC" >"$log" 2>&1; then
        return 0
    fi
    say "build failed; last lines of $log:"
    grep -E -i 'error|could not|not found' "$log" | tail -n 15 >&2 || true
    return 1
}

start=$SECONDS
if ! build_wheel "$with_mpi"; then
    if [[ $with_mpi == 1 && $WANT_MPI == auto ]]; then
        say "the MPI build with $MPICXX failed; falling back to Gloo only (horovodrun --gloo works, srun launches will not)"
        cp "$CACHE/build-$slug.log" "$CACHE/mpi-failed-$mpi_id"
        with_mpi=0
        signature="horovod=$HOROVOD_VERSION python=$PYTAG torch=$TORCH_VERSION cuda=$TORCH_CUDA gloo=1 mpi=0:none nccl=$with_nccl launcher=$LAUNCHER_PATCH"
        sed -i "s/^SIGNATURE = .*/SIGNATURE = \"$signature\"/" "$SRC/horovod/_climseg_build.py"
        slug=$(echo "$signature" | sha1sum | cut -c1-12)
        WHEELDIR=$CACHE/wheels/$slug
        build_wheel 0 || die "the Gloo-only build failed too; see $CACHE/build-*.log"
    else
        die "horovod build failed; see $CACHE/build-$slug.log"
    fi
fi
say "built in $((SECONDS - start)) s"
install_wheel || die "no wheel appeared in $WHEELDIR"
rm -rf "$BUILD"
[[ $(installed_signature) == "$signature" ]] || die "installed horovod does not report the build signature"
check_build

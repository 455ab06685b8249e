"""Setup and launch: the Makefile, tools/install_horovod.sh, the jobs/ scripts, Horovod itself
under horovodrun and srun, and (where slurm-wlm and munge are installed and we are root) a real
one-node Slurm running jobs/slurm.sbatch with 2 tasks on CPU."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from climseg.dist import launcher_rank_size
from conftest import HUNG_S, require_horovod, wait_for
from exact import assert_same_weights, losses

REQUIRE_SLURM = os.environ.get("CLIMSEG_REQUIRE_SLURM") == "1"  # .ci/run sets it

REPO = Path(__file__).resolve().parents[1]
PYBIN = Path(sys.executable).parent
HOROVODRUN = PYBIN / "horovodrun"
SCRIPTS = ["jobs/workstation.sh", "jobs/elastic.sh", "jobs/slurm.sbatch", "tools/install_horovod.sh",
           ".ci/run", "tests/slurm_local.sh", "tests/cluster.sh", "tests/cluster_bin/ssh"]

# One allreduce and where each rank thinks it is: what the launch paths must get right.
HVD_PROBE = """
import json, os, torch, horovod.torch as hvd
hvd.init()
total = hvd.allreduce(torch.tensor([hvd.rank() + 1.0]), op=hvd.Sum).item()
print("PROBE " + json.dumps({"rank": hvd.rank(), "size": hvd.size(), "local": hvd.local_rank(),
      "mpi": hvd.mpi_enabled(), "total": total,
      "slurm_local": os.environ.get("SLURM_LOCALID")}), flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{PYBIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(cmd, timeout=300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=kw.pop("cwd", REPO), capture_output=True, text=True,
                          timeout=timeout, **kw)


def _probes(output: str) -> list[dict]:
    rows = [json.loads(line.split("PROBE ", 1)[1]) for line in output.splitlines()
            if "PROBE " in line]
    return sorted(rows, key=lambda r: r["rank"])


def _horovod_features() -> dict[str, bool] | None:
    try:
        import horovod.torch as hvd
    except ImportError:
        return None
    return {"mpi": hvd.mpi_built(), "gloo": hvd.gloo_built()}


# conftest's `horovod` fixture: a skip without Horovod, a failure under make test; the test is
# marked multiprocess (and slow)
needs_horovod = pytest.mark.usefixtures("horovod")


# --- the scripts --------------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses_and_is_executable(script):
    path = REPO / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    result = _run(["bash", "-n", str(path)])
    assert result.returncode == 0, result.stderr


def _run_ci(tmp_path: Path, uid: int, apt_works: bool = True) -> tuple[int, str, list[str]]:
    """Run .ci/run with stand-ins for id, apt-get and make on a PATH without Slurm's client
    commands; the stand-in apt-get "installs" Slurm by creating its commands. Returns the exit
    status, stderr and the log of the stand-ins' calls."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    log.touch()
    installed = "".join(f'printf "#!/bin/sh\\n" > {bin_dir}/{exe}; chmod +x {bin_dir}/{exe}\n'
                        for exe in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "ip",
                                    "unshare", "nsenter"))
    stubs = {
        "id": f"echo {uid}",
        "apt-get": f'echo "apt-get $*" >> {log}\n' + (
            f'if [ "$1" = install ]; then\n{installed}fi' if apt_works else "exit 100"),
        "make": f'echo "make $* REQUIRE_SLURM=${{CLIMSEG_REQUIRE_SLURM:-unset}}" >> {log}',
        "dirname": 'exec /usr/bin/dirname "$@"',
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    result = subprocess.run(["/bin/bash", str(REPO / ".ci/run")], capture_output=True,
                            text=True, timeout=60, env={"PATH": str(bin_dir)})
    return result.returncode, result.stderr, log.read_text().splitlines()


def test_ci_installs_slurm_as_root_and_requires_its_tests(tmp_path):
    code, _, calls = _run_ci(tmp_path, uid=0)
    assert code == 0
    assert calls == ["apt-get update -q",
                     "apt-get install -y -q --no-install-recommends slurm-wlm munge iproute2 "
                     "util-linux",
                     "make test REQUIRE_SLURM=1"]


def test_ci_as_a_user_installs_nothing_and_still_runs_make_test(tmp_path):
    code, err, calls = _run_ci(tmp_path, uid=1000)
    assert code == 0
    assert calls == ["make test REQUIRE_SLURM=unset"]
    assert "the Slurm tests will skip" in err


def test_ci_runs_the_tests_when_apt_fails(tmp_path):
    code, err, calls = _run_ci(tmp_path, uid=0, apt_works=False)
    assert code == 0
    assert calls == ["apt-get update -q", "make test REQUIRE_SLURM=unset"]
    assert "could not install slurm-wlm munge iproute2 util-linux" in err


def _readme_demo_commands() -> list[str]:
    """The commands README.md says `make demo` runs (the block after "`make demo` then runs")."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("`make demo` then runs", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


# The Makefile calls the data steps through their tools/ aliases with the older flag spellings;
# the README shows the `climseg` subcommands with today's flags (the aliases map one to one).
_ALIASES = {"python tools/make_synthetic.py": "climseg make-synthetic",
            "python tools/split_data.py": "climseg split",
            "python tools/summarize_data.py": "climseg summarize",
            "python tools/check_data.py": "climseg check --data",
            "python tools/stage_data.py": "climseg stage",
            "python -m climseg.train": "climseg train"}
_OLD_FLAGS = {"--out": "--output", "--input": "--data", "--source": "--data", "--dest": "--output"}


def _current_spelling(line: str) -> str:
    for alias, command in _ALIASES.items():
        line = line.replace(alias, command)
    return " ".join(_OLD_FLAGS.get(word, word) for word in line.split(" "))


def test_make_demo_runs_the_documented_commands(tmp_path):
    demo, run = tmp_path / "demo", tmp_path / "run"
    result = _run(["make", "-n", "demo", f"DEMO_DIR={demo}", f"RUN_DIR={run}"])
    assert result.returncode == 0, result.stderr
    documented = _readme_demo_commands()
    assert len(documented) == 6
    expected = [cmd.replace("data/demo", str(demo)).replace("runs/demo", str(run))
                for cmd in documented]
    # make adds overwrite=true (a re-run starts over; the README says so beside the commands):
    # the documented command is a first run's.
    lines = [_current_spelling(line.strip()).removesuffix(" overwrite=true")
             for line in result.stdout.splitlines()]
    found = [next((i for i, line in enumerate(lines) if line == cmd), None) for cmd in expected]
    assert None not in found, "\n".join(c for c, i in zip(expected, found) if i is None)
    assert found == sorted(found), "demo steps out of order"


def test_make_demo_overrides_reach_the_commands(tmp_path):
    demo = tmp_path / "demo"
    result = _run(["make", "-n", "demo", f"DEMO_DIR={demo}", "NP=3", "DEMO_SAMPLES=8",
                   "DEMO_HEIGHT=32", "DEMO_WIDTH=48", "TRAIN_ARGS=train.max_steps=2"])
    assert result.returncode == 0, result.stderr
    assert "--samples 8 --seed 1 --height 32 --width 48" in result.stdout
    assert "horovodrun -np 3 --gloo python -m climseg.train" in result.stdout
    assert "train.max_steps=2" in result.stdout


def test_make_demo_reuses_finished_steps(tmp_path):
    demo = tmp_path / "demo"
    stamps = demo / ".stamps"
    stamps.mkdir(parents=True)
    # what an earlier run leaves behind, oldest first
    (stamps / "data-params").write_text(
        "samples=96 seed=1 height=768 width=1152 split_seed=12345\n")
    (stamps / "stage-params").write_text("np=2\n")
    for i, name in enumerate(["raw", "split", "summary", "checked", "staged"]):
        (stamps / name).touch()
        os.utime(stamps / name, (1.5e9 + i, 1.5e9 + i))
    os.utime(stamps / "data-params", (1e9, 1e9))
    os.utime(stamps / "stage-params", (1e9, 1e9))
    result = _run(["make", "-n", "demo", f"DEMO_DIR={demo}"])
    assert result.returncode == 0, result.stderr
    assert "make_synthetic.py" not in result.stdout
    assert "stage_data.py" not in result.stdout
    assert "climseg.train" in result.stdout
    # another rank count restages but keeps the data
    result = _run(["make", "-n", "demo", f"DEMO_DIR={demo}", "NP=4"])
    assert "make_synthetic.py" not in result.stdout
    assert "horovodrun -np 4 --gloo python tools/stage_data.py" in result.stdout


@pytest.mark.slow   # two short training runs
def test_the_demo_config_trains_the_same_twice(tiny_root, tmp_path):
    """The README's demo figures are one run's, and meant to be every run's on the same
    machine: its settings (AdamW, zscore, 2 reader threads, random crops, cosine warm-up) leave no
    randomness beyond the seed. Two 3-step runs of yaml/demo.yaml agree to the bit (measured
    on the earlier 192x288 demo: identical losses at all 64 steps, eval mean IoU 0.5346 both
    times. The full-size demo's 96 steps, run three times on this machine: twice identical to
    the bit (eval 0.5019 at step 76); once the same to step 24 and a little apart from step 28
    on (0.5019 at step 76, 0.5014 against 0.5015 at the end), cause not found)."""
    def run(out: Path) -> dict[int, float]:
        proc = subprocess.run(
            [sys.executable, "-m", "climseg.train", "--config", str(REPO / "yaml" / "demo.yaml"),
             f"data.root={tiny_root}", f"output_dir={out}", "data.crop=[32,48]",
             "data.validation_crop=null", "train.local_batch_size=2", "train.max_steps=3",
             "train.log_frequency=1", "train.validation_frequency=0", "train.save_frequency=0",
             "model.width=0.25"],
            capture_output=True, text=True, cwd=REPO, timeout=600,
            env=dict(os.environ, PYTHONPATH=str(REPO)))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return losses(out)

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert sorted(first) == [1, 2, 3] and first == second
    assert_same_weights(tmp_path / "a", tmp_path / "b", rel=0.0)


def test_make_test_fast_leaves_out_the_slow_tests_and_make_test_none():
    fast = _run(["make", "-n", "test-fast"])
    assert fast.returncode == 0, fast.stderr
    (pytest_line,) = [line for line in fast.stdout.splitlines() if "-m pytest" in line]
    assert '-m "not slow"' in pytest_line and "CLIMSEG_REQUIRE_INSTALL=1" in pytest_line
    full = _run(["make", "-n", "test"])
    assert full.returncode == 0, full.stderr
    (pytest_line,) = [line for line in full.stdout.splitlines() if "-m pytest" in line]
    assert " -m " not in pytest_line.split("-m pytest", 1)[1] and "--durations=15" in pytest_line
    assert "CLIMSEG_REQUIRE_INSTALL=1" in pytest_line
    # what -m "not slow" collects here: the unit tests, none that launches ranks
    collected = _run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow",
                      "tests/test_launch.py"], env=_env()).stdout
    assert "test_launcher_rank_size_under_srun_pmi2" in collected
    assert "test_horovodrun_gloo_two_ranks" not in collected
    assert "test_workstation_stages_and_trains" not in collected


@pytest.mark.parametrize("args, message", [
    (["NP=0"], "NP=0: expected a positive number of ranks"),
    (["NP=two"], "NP=two: expected a positive number of ranks"),
    (["DEMO_DIR="], "DEMO_DIR is empty"),
])
def test_make_rejects_bad_settings(args, message):
    result = _run(["make", "-n", "demo", *args])
    assert result.returncode != 0
    assert message in result.stderr


# --- install_horovod.sh -------------------------------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"CLIMSEG_HOROVOD_MPI": "yes"}, "CLIMSEG_HOROVOD_MPI=yes: expected auto, 1 or 0"),
    ({"CLIMSEG_HOROVOD_NCCL": "maybe"}, "CLIMSEG_HOROVOD_NCCL=maybe: expected auto, 1 or 0"),
    ({"PYTHON": "/nonexistent/python"}, "python interpreter '/nonexistent/python' not found (set PYTHON=...)"),
    ({"MPICXX": "no-such-mpicxx"}, "MPICXX=no-such-mpicxx: not found on PATH"),
    ({"MPICXX": "/nonexistent/mpicxx"}, "MPICXX=/nonexistent/mpicxx is not an executable"),
])
def test_install_horovod_rejects_bad_settings(env, message):
    result = _run([str(REPO / "tools/install_horovod.sh")], env=_env(**env))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"install_horovod: error: {message}"


def test_install_horovod_names_missing_torch(tmp_path):
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = _run([str(REPO / "tools/install_horovod.sh")],
                  env=_env(PYTHON=str(venv / "bin" / "python")))
    assert result.returncode == 1
    assert "torch is not importable" in result.stderr


def test_horovod_launcher_patch_refuses_text_it_does_not_know(tmp_path):
    """tools/patch_horovod.py on another Horovod (here: the launcher files of a patched one,
    whose texts are no longer the originals): exit 1 naming the file, nothing half-done."""
    installed = Path(sys.executable).parent.parent / "lib"
    sources = sorted(installed.glob("python3*/site-packages/horovod/runner/gloo_run.py"))
    if not sources:
        pytest.skip("no installed horovod to take the launcher files from")
    package = tmp_path / "horovod"
    (package / "runner" / "common" / "util").mkdir(parents=True)
    (package / "runner" / "gloo_run.py").write_text(sources[0].read_text())
    safe = sources[0].parent / "common" / "util" / "safe_shell_exec.py"
    (package / "runner" / "common" / "util" / "safe_shell_exec.py").write_text(
        safe.read_text().replace("GRACEFUL_TERMINATION_TIME_S = _grace_seconds()", "")
        .replace("GRACEFUL_TERMINATION_TIME_S = 5\n", ""))
    result = _run([sys.executable, str(REPO / "tools/patch_horovod.py"), str(package)])
    assert result.returncode == 1
    assert result.stderr.startswith("patch_horovod: error: ")
    assert "safe_shell_exec.py: expected the text 'GRACEFUL_TERMINATION_TIME_S = 5'" \
        in result.stderr
    assert (package / "runner" / "gloo_run.py").read_text() == sources[0].read_text()


def test_install_horovod_cuda_build_needs_cuda_torch():
    import torch

    if torch.version.cuda:
        pytest.skip("torch has CUDA here")
    result = _run([str(REPO / "tools/install_horovod.sh")],
                  env=_env(PYTHON=sys.executable, CLIMSEG_HOROVOD_NCCL="1"))
    assert result.returncode == 1
    assert "built without CUDA" in result.stderr.strip().splitlines()[-1]


def _fake_nvcc(root: Path) -> Path:
    nvcc = root / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    return root


def _fake_cuda_torch(root: Path, nccl: bool) -> Path:
    """A stand-in `torch` that says it was built with CUDA 13.0 (and an nvidia-nccl package):
    enough for the script to take its GPU path up to the build, on a machine without CUDA."""
    (root / "torch").mkdir(parents=True)
    (root / "torch" / "__init__.py").write_text(
        '__version__ = "2.13.0+cu130"\n'
        "class version:\n    cuda = '13.0'\n"
        "class cuda:\n    @staticmethod\n    def device_count():\n        return 0\n")
    if nccl:
        for sub in ("include", "lib"):
            (root / "nvidia" / "nccl" / sub).mkdir(parents=True)
        (root / "nvidia" / "nccl" / "include" / "nccl.h").touch()
        (root / "nvidia" / "nccl" / "lib" / "libnccl.so.2").touch()
    return root


def test_install_horovod_gpu_build_settings(tmp_path):
    fake = _fake_cuda_torch(tmp_path / "site", nccl=True)
    cache = tmp_path / "cache"
    result = _run([str(REPO / "tools/install_horovod.sh")], env=_env(
        PYTHON=sys.executable, PYTHONPATH=str(fake), CLIMSEG_HOROVOD_CACHE=str(cache),
        CLIMSEG_HOROVOD_DRY_RUN="1", CUDA_HOME=str(_fake_nvcc(tmp_path / "cuda"))))
    assert result.returncode == 0, result.stderr
    settings = result.stdout.splitlines()
    for setting in ("HOROVOD_GPU_OPERATIONS=NCCL", "HOROVOD_NCCL_LINK=SHARED",
                    "HOROVOD_WITH_GLOO=1", "CMAKE_POLICY_VERSION_MINIMUM=3.5",
                    "HOROVOD_BUILD_CUDA_CC_LIST=80,90"):
        assert setting in settings
    assert any("-include cstdint -include string -include stdexcept" in s for s in settings)
    (home,) = [s.split("=", 1)[1] for s in settings if s.startswith("HOROVOD_NCCL_HOME=")]
    # linked against the pip package's NCCL through an unversioned libnccl.so link
    assert Path(home, "lib", "libnccl.so").resolve() == \
        (fake / "nvidia" / "nccl" / "lib" / "libnccl.so.2").resolve()
    assert Path(home, "include", "nccl.h").exists()
    assert "nccl=1" in result.stderr and "cuda=13.0" in result.stderr


def test_install_horovod_gpu_build_names_missing_nvcc(tmp_path):
    fake = _fake_cuda_torch(tmp_path / "site", nccl=True)
    result = _run([str(REPO / "tools/install_horovod.sh")], env=_env(
        PYTHON=sys.executable, PYTHONPATH=str(fake), CLIMSEG_HOROVOD_CACHE=str(tmp_path / "c"),
        CLIMSEG_HOROVOD_DRY_RUN="1", CUDA_HOME="/nonexistent", PATH=f"{PYBIN}:/usr/bin:/bin"))
    assert result.returncode == 1
    assert "nvcc was not found" in result.stderr.strip().splitlines()[-1]


def test_install_horovod_gpu_build_names_missing_nccl(tmp_path):
    if Path("/usr/include/nccl.h").exists():
        pytest.skip("a system NCCL is installed here")
    fake = _fake_cuda_torch(tmp_path / "site", nccl=False)
    result = _run([str(REPO / "tools/install_horovod.sh")], env=_env(
        PYTHON=sys.executable, PYTHONPATH=str(fake), CLIMSEG_HOROVOD_CACHE=str(tmp_path / "c"),
        CLIMSEG_HOROVOD_DRY_RUN="1", CUDA_HOME=str(_fake_nvcc(tmp_path / "cuda"))))
    assert result.returncode == 1
    assert "no NCCL was found" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow   # imports horovod.torch twice
def test_install_horovod_skips_a_matching_build():
    require_horovod()
    try:
        import horovod._climseg_build  # noqa: F401
    except ImportError:
        pytest.skip("horovod here was not installed by tools/install_horovod.sh")
    result = _run([str(REPO / "tools/install_horovod.sh")], env=_env(PYTHON=sys.executable))
    assert result.returncode == 0, result.stderr
    assert "already installed and matching" in result.stderr
    assert "horovod.torch loads: gloo=1" in result.stdout
    assert "building" not in result.stderr


# --- Horovod under horovodrun, and rank derivation ----------------------------------------------
@needs_horovod
def test_horovodrun_gloo_two_ranks():
    result = _run([str(HOROVODRUN), "-np", "2", "--gloo", sys.executable, "-c", HVD_PROBE],
                  env=_env(), timeout=HUNG_S)
    assert result.returncode == 0, result.stdout + result.stderr
    probes = _probes(result.stdout)
    assert [(p["rank"], p["size"], p["local"], p["total"]) for p in probes] == \
        [(0, 2, 0, 3.0), (1, 2, 1, 3.0)]


@pytest.mark.parametrize("environ, expected", [
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}, (5, 8, 1)),
    ({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "2", "HOROVOD_LOCAL_RANK": "1",
      "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, (1, 2, 1)),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4",
      "OMPI_COMM_WORLD_LOCAL_RANK": "3"}, (3, 4, 3)),
    ({}, (0, 1, 0)),
])
def test_launcher_rank_size(environ, expected):
    assert launcher_rank_size(environ) == expected


def test_launcher_rank_size_under_srun_pmi2():
    # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE but no MPI_LOCALRANKID: the local rank comes
    # from SLURM_LOCALID.
    # the variables `srun --mpi=pmi2 -n 2` gives task 1 (read off a real srun)
    environ = {"PMI_FD": "13", "PMI_JOBID": "2.0", "PMI_RANK": "1", "PMI_SIZE": "2",
               "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
               "SLURM_STEP_NUM_TASKS": "2", "SLURM_TASKS_PER_NODE": "2"}
    assert launcher_rank_size(environ) == (1, 2, 1)


def test_launcher_rank_size_rejects_bad_variables():
    with pytest.raises(RuntimeError, match="SLURM_PROCID/SLURM_NTASKS"):
        launcher_rank_size({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})
    with pytest.raises(RuntimeError, match="rank 2 outside size 2"):
        launcher_rank_size({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"})


# --- jobs/workstation.sh ------------------------------------------------------------------------
def test_workstation_requires_data():
    env = _env()
    env.pop("DATA", None)
    result = _run(["bash", "jobs/workstation.sh"], env=env)
    assert result.returncode != 0
    assert "set DATA to the prepared data set folder" in result.stderr


def test_workstation_rejects_bad_ngpus(tmp_path):
    result = _run(["bash", "jobs/workstation.sh"], env=_env(DATA=str(tmp_path), NGPUS="0"))
    assert result.returncode == 2
    assert result.stderr.strip() == "workstation.sh: NGPUS=0 is not a positive number"


def test_workstation_rejects_an_unknown_controller(tmp_path):
    result = _run(["bash", "jobs/workstation.sh"], env=_env(
        DATA=str(tmp_path), NGPUS="2", HOROVOD_CONTROLLER="openmpi"))
    assert result.returncode == 2
    assert result.stderr.strip() == \
        "workstation.sh: HOROVOD_CONTROLLER=openmpi: expected gloo or mpi"


@needs_horovod
def test_workstation_stages_and_trains(tiny_root, tmp_path):
    # with the defaults: horovodrun's Gloo controller, which every `make install` builds
    out, staged = tmp_path / "run", tmp_path / "staged"
    env = _env(DATA=str(tiny_root), NGPUS="2", CONFIG="yaml/ci.yaml", STAGE_DIR=str(staged),
               OUTPUT=str(out))
    env.pop("HOROVODRUN_ARGS", None)
    env.pop("HOROVOD_CONTROLLER", None)
    result = _run(["bash", "jobs/workstation.sh"], timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert (staged / "train" / "index.txt").is_file()
    assert (out / "metrics.jsonl").is_file()


@needs_horovod
def test_workstation_passes_a_sigterm_to_the_ranks_who_stop_with_a_checkpoint(tiny_root,
                                                                               tmp_path):
    # Signalled itself, horovodrun would freeze and kill its ranks: the script signals them.
    out = tmp_path / "run"
    env = _env(DATA=str(tiny_root), NGPUS="2", CONFIG="yaml/ci.yaml", STAGE="0",
               OUTPUT=str(out))
    env.pop("HOROVODRUN_ARGS", None)
    env.pop("HOROVOD_CONTROLLER", None)
    log = tmp_path / "log"
    proc = subprocess.Popen(["bash", "jobs/workstation.sh", "train.max_steps=200",
                             "train.log_frequency=1"], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        metrics = out / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and '"train"' in metrics.read_text(), proc, log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=HUNG_S) == 3, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    (path,) = out.glob("ckpt-step*.pt")
    assert "stopped by SIGUSR1 (2 of 2 ranks) at step" in text and str(path) in text, text
    assert "Process 0 exit with status code 3." in text or "Process 1 exit with status code 3." \
        in text, text[-3000:]
    # (horovodrun's own traceback about a non-zero exit is the launcher's, not a rank's)
    assert not [line for line in text.splitlines() if line.startswith("[") and "Traceback" in line]


# --- jobs/slurm.sbatch: what it refuses before any srun ----------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({}, "run this with sbatch (or inside salloc)"),
    ({"SLURM_JOB_ID": "7"}, "set DATA to the prepared data set folder"),
    ({"SLURM_JOB_ID": "7", "DATA": "/nonexistent/cam"}, "slurm.sbatch: DATA=/nonexistent/cam is not a folder"),
    ({"SLURM_JOB_ID": "7", "DATA": "/tmp", "CONFIG": "yaml/none.yaml"},
     "slurm.sbatch: CONFIG=yaml/none.yaml not found"),
])
def test_slurm_script_rejects_bad_settings(extra, message):
    env = {k: v for k, v in _env().items() if not k.startswith("SLURM_") and k not in ("DATA", "CONFIG")}
    env.update(extra)
    result = _run(["bash", "jobs/slurm.sbatch"], env=env)
    assert result.returncode != 0
    assert message in result.stderr.strip().splitlines()[-1]


# --- a real one-node Slurm ----------------------------------------------------------------------
def _free_port_pair() -> int:
    for _ in range(50):
        port = random.randrange(20000, 60000, 2)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("", port))
                b.bind(("", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two free consecutive ports for a test Slurm")


def require_slurm(*more: str) -> None:
    """Skip the calling test without Slurm's daemons and clients (and the commands ``more``)
    or without root; fail it instead under CLIMSEG_REQUIRE_SLURM=1."""
    missing = [exe for exe in ("munged", "slurmctld", "slurmd", "sbatch", "srun", *more)
               if shutil.which(exe) is None]
    # .ci/run installs Slurm where it can and then requires these tests to run
    unavailable = pytest.fail if REQUIRE_SLURM else pytest.skip
    if missing:
        unavailable(f"Slurm not installed ({', '.join(missing)} missing; "
                    "apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        unavailable("a local slurmd needs root")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    require_slurm()
    # short path: the munge socket must fit a unix socket name
    state = Path(tmp_path_factory.mktemp("slurm"))
    env = _env(SLURM_LOCAL_PORT=str(_free_port_pair()))
    result = _run(["bash", "tests/slurm_local.sh", "start", str(state)], env=env, timeout=120)
    if result.returncode != 0:
        _run(["bash", "tests/slurm_local.sh", "stop", str(state)])
        pytest.fail(f"local Slurm did not start: {result.stderr.strip()}")
    yield _env(SLURM_CONF=str(state / "slurm.conf"))
    _run(["bash", "tests/slurm_local.sh", "stop", str(state)])


@needs_horovod
def test_srun_starts_horovod_through_mpi(slurm):
    if not _horovod_features()["mpi"]:
        pytest.skip("horovod built without MPI: srun launches need the MPI controller")
    result = _run(["srun", "--mpi=pmi2", "-n", "2", sys.executable, "-c", HVD_PROBE],
                  env=slurm, timeout=HUNG_S, cwd="/tmp")
    assert result.returncode == 0, result.stdout + result.stderr
    probes = _probes(result.stdout)
    assert [(p["rank"], p["size"], p["mpi"], p["total"]) for p in probes] == \
        [(0, 2, True, 3.0), (1, 2, True, 3.0)]
    # Horovod's local rank (which picks the GPU) agrees with Slurm's
    assert [p["local"] for p in probes] == [int(p["slurm_local"]) for p in probes]


def test_launcher_rank_size_under_a_real_srun(slurm):
    code = ("import json, os; from climseg.dist import launcher_rank_size; "
            "print('PROBE ' + json.dumps(dict(zip(('rank', 'size', 'local'), launcher_rank_size()), "
            "slurm_local=os.environ['SLURM_LOCALID'])))")
    for mpi in ("pmi2", "none"):
        # from /tmp: the installed package, not the checkout's folder, is what imports
        result = _run(["srun", f"--mpi={mpi}", "-n", "2", sys.executable, "-c", code],
                      env=slurm, timeout=HUNG_S, cwd="/tmp")
        assert result.returncode == 0, result.stdout + result.stderr
        probes = _probes(result.stdout)
        assert [(p["rank"], p["size"]) for p in probes] == [(0, 2), (1, 2)], mpi
        assert [p["local"] for p in probes] == [int(p["slurm_local"]) for p in probes], mpi


@needs_horovod
def test_sbatch_stages_and_trains(slurm, tiny_root, tmp_path):
    if not _horovod_features()["mpi"]:
        pytest.skip("horovod built without MPI: srun launches need the MPI controller")
    out, staged, log = tmp_path / "run", tmp_path / "staged", tmp_path / "job.out"
    env = dict(slurm, DATA=str(tiny_root), CONFIG="yaml/ci.yaml", OUTPUT=str(out),
               STAGE_DIR=str(staged), VENV=str(PYBIN.parent))
    # the header asks for 4 GPU nodes; on this CPU node: one node, 2 tasks, no GPUs
    submit = _run(["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2",
                   "--cpus-per-task=1", "--gpus-per-node=0", "--time=15", f"--output={log}",
                   "jobs/slurm.sbatch", "train.log_frequency=3"], env=env, timeout=60)
    assert submit.returncode == 0, submit.stderr
    state, code = _wait_for_job(env, submit.stdout.strip().split(";")[0])
    text = log.read_text() if log.exists() else ""
    assert (state, code) == ("COMPLETED", "0:0"), text[-4000:]
    assert (staged / "train" / "index.txt").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in rows)
    # "$@" reached the trainer
    assert "log_frequency: 3" in (out / "config.yaml").read_text()


# --- Dockerfile.horovod (no Docker engine here) --------------------------------------------------
def test_dockerfile_copies_only_files_that_exist():
    # A renamed or deleted file breaks `docker build` at its COPY line.
    copies = [line.split()[1:-1] for line in
              (REPO / "Dockerfile.horovod").read_text().splitlines() if line.startswith("COPY ")]
    assert copies, "Dockerfile.horovod has no COPY line"
    missing = [src for sources in copies for src in sources
               if not src.startswith("--") and not (REPO / src).exists()]
    assert not missing, f"Dockerfile.horovod copies missing {missing}"


# --- jobs/slurm.sbatch stopped by Slurm's warning signal, requeued, resumed -------------------
def _job_field(env: dict, job: str, field: str) -> str:
    out = _run(["scontrol", "show", "job", job], env=env, timeout=30).stdout
    for word in out.split():
        if word.startswith(field + "="):
            return word.split("=", 1)[1]
    return ""


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _wait_for_job(env: dict, job: str) -> tuple[str, str]:
    """(JobState, ExitCode) of ``job`` once it has ended, read every second. Not ``sbatch
    --wait``: it polls ever more slowly (a job of 12 s took 42 s to be reported)."""
    deadline = time.monotonic() + HUNG_S
    while (state := _job_field(env, job, "JobState")) not in ENDED:
        assert time.monotonic() < deadline, f"job {job} still {state}"
        time.sleep(1)
    return state, _job_field(env, job, "ExitCode")


def run_requeued(env: dict, sbatch_args: list[str], overrides: list[str], out: Path,
                 log: Path) -> str:
    """Submit jobs/slurm.sbatch (``sbatch_args``, trainer ``overrides``, its run in ``out``,
    its output in ``log``), send it the early-warning signal once it has taken a step, and
    wait for it to end; assert it completed after one requeue. Returns the job's output."""
    # The header's --signal=USR1@300 is what a time limit sends; slurmctld checks limits only
    # every ~30 s, so a one-minute limit here stops the job anywhere or not at all. The test
    # sends the same signal the same way (slurmctld -> slurmd -> the job step's tasks) once the
    # run has taken a step.
    submit = _run(["sbatch", "--parsable", *sbatch_args, f"--output={log}", "jobs/slurm.sbatch",
                   *overrides], env=env, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    metrics = out / "metrics.jsonl"
    deadline, signalled, ended, idle = time.monotonic() + 900, False, 0, 0
    # A job that requeues itself passes through an ended state (its batch step is cancelled
    # by the requeue) on its way back to PENDING: an ended state counts once it was read 10
    # times in a row, a second apart (seen once: FAILED read mid-requeue, the segment after
    # it never waited for).
    while ended < 10:
        state = _job_field(env, job, "JobState")
        ended = ended + 1 if state in ENDED else 0
        assert time.monotonic() < deadline, log.read_text()[-4000:] if log.exists() else state
        if not signalled and metrics.exists() and '"train"' in metrics.read_text():
            _run(["scancel", "--signal=USR1", job], env=env, timeout=30)
            signalled = True
        if state == "PENDING" and _job_field(env, job, "Reason") == "BeginTime":
            # Slurm holds a requeued job for two minutes; the test need not wait them out, but
            # must wait for every node to have ended the first segment: a node still cleaning
            # up revokes the new segment's credential too ("Killing non-startable batch JobId=9:
            # Job credential revoked", seen on two loaded nodes). Released after two reads of
            # all nodes idle, a second apart.
            nodes = _run(["sinfo", "-h", "-N", "-o", "%t"], env=env, timeout=30).stdout.split()
            idle = idle + 1 if nodes and all(n == "idle" for n in nodes) else 0
            if idle >= 2:
                _run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=env,
                     timeout=30)
        time.sleep(1)
    text = log.read_text()
    assert state == "COMPLETED", text[-4000:]
    assert _job_field(env, job, "Restarts") == "1", text[-4000:]
    assert "requeueing job" in text and "segment 2" in text, text[-4000:]
    return text

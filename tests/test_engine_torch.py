"""The torch.distributed engine (``dist.engine=torch``) against Horovod and one process.

Multi-rank runs use torchrun (``python -m torch.distributed.run --standalone``) on Gloo. The
exact comparisons need an optimizer linear in the gradients (SGD, fp32): AdamW divides by
sqrt(v), which turns rounding-level differences of near-zero gradients into visible ones.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from climseg.checkpoint import step_checkpoints
from climseg.dist.torch_engine import _first_host, rendezvous
from climseg.optim import OPTIMIZERS
from conftest import HOROVODRUN, require_horovod

# Ranks or training in (nearly) every test: out of make test-fast, and the launcher guard's
# multiprocess mark (tests/conftest.py).
pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "yaml" / "ci.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
STEPS = 6

# SGD once it exists (optimizer.name: sgd, from the oracles branch); until then AdamW, whose
# tolerance was measured: torch vs one process bit-identical parameters (DDP divides then
# sums, as accumulation does), torch vs Horovod 1.2e-4 (Horovod sums then divides; AdamW's
# 1/sqrt(v) magnifies that rounding), losses within 1.2e-7 everywhere.
if "sgd" in OPTIMIZERS:
    OPTIMIZER, TOL = ["optimizer.name=sgd", "optimizer.lr=0.01"], 1e-5
else:
    OPTIMIZER, TOL = ["optimizer.name=adamw"], 1e-3


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _common(root: Path, out: Path) -> list[str]:
    # One sample per rank and micro-batch, files in order and uncropped: 2 ranks x 1 sample
    # then see exactly what one process sees in 2 accumulated micro-batches of 1 (batch norm
    # included: its statistics are per micro-batch either way).
    return [f"data.root={root}", f"output_dir={out}", "data.shuffle=false", "data.crop=null",
            "train.local_batch_size=1", f"train.max_steps={STEPS}", "train.log_frequency=1",
            "train.validation_frequency=0", "data.max_validation_samples=2",
            "train.cpu_threads=1", *OPTIMIZER]


def _train_args(*overrides: str) -> list[str]:
    return ["-m", "climseg.train", "--config", str(CI), *overrides]


def _run(cmd: list[str], timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(**env),
                          timeout=timeout)


def torchrun(n: int, *overrides: str) -> subprocess.CompletedProcess:
    return _run(TORCHRUN + [str(n)] + _train_args("--engine", "torch", *overrides))


def horovodrun(n: int, *overrides: str) -> subprocess.CompletedProcess:
    require_horovod()
    return _run([str(HOROVODRUN), "-np", str(n), "-H", f"localhost:{n}", "--gloo",
                 sys.executable] + _train_args("--engine", "horovod", *overrides))


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    _, path = step_checkpoints(out)[-1]
    return torch.load(path, weights_only=True, mmap=True)["model"]


RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def max_weight_diff(a: Path, b: Path, buffers: bool = True) -> float:
    """The largest difference between two runs' final model tensors; ``buffers=False`` leaves
    out batch-norm running statistics (one process accumulating micro-batches updates them
    once per micro-batch, ranks once per step and then average them)."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    keys = [k for k in wa if buffers or not k.endswith(RUNNING_STATS)]
    return max((wa[k].double() - wb[k].double()).abs().max().item() for k in keys)


@pytest.fixture(scope="module")
def runs(tiny_root, tmp_path_factory):
    """The same 6 steps three ways: one process accumulating 2 micro-batches, 2 ranks under
    torchrun (torch engine), 2 ranks under horovodrun (Horovod engine)."""
    base = tmp_path_factory.mktemp("engines")
    out = {name: base / name for name in ("single", "torch", "horovod")}
    _ok(_run([sys.executable] + _train_args(*_common(tiny_root, out["single"]),
                                            "train.gradient_accumulation=2", "dist.engine=torch")))
    _ok(torchrun(2, *_common(tiny_root, out["torch"])))
    _ok(horovodrun(2, *_common(tiny_root, out["horovod"])))
    return out


def _assert_same_run(a: Path, b: Path, steps=range(1, STEPS + 1), buffers: bool = True) -> None:
    la, lb = losses(a), losses(b)
    for step in steps:
        assert abs(la[step] - lb[step]) <= TOL, (step, la[step], lb[step])
    assert max_weight_diff(a, b, buffers) <= TOL


def test_two_torch_ranks_match_one_process_with_accumulation(runs):
    assert sorted(losses(runs["torch"])) == list(range(1, STEPS + 1))
    _assert_same_run(runs["torch"], runs["single"], buffers=False)


def test_two_torch_ranks_match_two_horovod_ranks(runs):
    _assert_same_run(runs["torch"], runs["horovod"])


def test_torch_checkpoint_holds_the_unwrapped_model(runs):
    keys = list(final_weights(runs["torch"]))
    assert keys == list(final_weights(runs["horovod"]))
    assert not any(k.startswith("module.") for k in keys)


def test_torch_mlperf_log_has_the_topology(runs):
    events = [json.loads(line.split(":::MLLOG", 1)[1])
              for line in (runs["torch"] / "mlperf.log").read_text().splitlines()
              if ":::MLLOG" in line]
    values = {e["key"]: e["value"] for e in events}
    assert values["number_of_ranks"] == 2


def test_accumulation_and_fp16_compression_under_torch(tiny_root, tmp_path):
    # Accumulation (no_sync on the first micro-batch) and the fp16 communication hook: the
    # run stays within fp16's rounding of the uncompressed fp32 run of the same batches.
    plain, packed = tmp_path / "plain", tmp_path / "fp16"
    args = [*_common(tiny_root, plain), "train.gradient_accumulation=2", "train.max_steps=2"]
    _ok(torchrun(2, *args))
    _ok(torchrun(2, *[a.replace(str(plain), str(packed)) for a in args],
                 "train.gradient_compression=fp16"))
    lp, lc = losses(plain), losses(packed)
    assert lp[1] == lc[1]  # the first loss comes before any reduced gradient
    # fp16 gradients move the run by rounding only: the step-2 loss within 1e-4 relative (at
    # width 0.25 it can come out bit-identical), the parameters apart (the hook is on) by at
    # most 1e-2 after 2 steps of lr 0.002.
    assert abs(lp[2] - lc[2]) <= 1e-4 * abs(lp[2])
    assert 0 < max_weight_diff(plain, packed, buffers=False) <= 1e-2


def _wait_for_step(out: Path, proc: subprocess.Popen, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        metrics = out / "metrics.jsonl"
        if metrics.exists() and max(losses(out), default=0) >= step:
            return
        time.sleep(1)
    pytest.fail(f"no step {step} within {timeout} s")


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if env.get("RANK") == str(rank) and "climseg.train" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no rank {rank} under the launcher")


def test_sigterm_to_one_rank_stops_all_and_resume_crosses_engines(tiny_root, tmp_path):
    # A run far longer than the wait for its step 2, so the signal always lands mid-run
    # (a step of ci.yaml's narrow model takes a fraction of a second); the resumed runs then
    # stop 2 steps past the stop and are compared with an uninterrupted run of that length.
    stopped = tmp_path / "stopped"
    longer = ["train.max_steps=100000", "train.max_epochs=100000"]
    proc = subprocess.Popen(TORCHRUN + ["2"] + _train_args("--engine", "torch",
                                                           *_common(tiny_root, stopped), *longer),
                            cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(stopped, proc, 2)
        _rank_process(proc, 1).send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    # torchrun itself fails when a worker exits non-zero; every rank's own status is 3.
    assert proc.returncode != 0, output[-3000:]
    assert "stopped by SIGTERM (1 of 2 ranks)" in output, output[-3000:]
    assert "exitcode" not in output or "exitcode  : 3" in output, output[-3000:]
    step, _ = step_checkpoints(stopped)[-1]
    assert step >= 2
    assert sorted(losses(stopped)) == list(range(1, step + 1))

    # Resumed under the same engine, and a copy under the other: both continue exactly.
    end = [f"train.max_steps={step + 2}", "train.max_epochs=100000"]
    other, whole = tmp_path / "other", tmp_path / "whole"
    shutil.copytree(stopped, other)
    _ok(torchrun(2, *_common(tiny_root, stopped), *end, "resume=auto"))
    _ok(horovodrun(2, *_common(tiny_root, other), *end, "resume=auto"))
    _ok(torchrun(2, *_common(tiny_root, whole), *end))
    for resumed in (stopped, other):
        assert sorted(losses(resumed)) == list(range(1, step + 3))
        # Parameters only: a resume broadcasts rank 0's batch-norm running statistics (the
        # stopped run saved them unaveraged), under either engine; the losses show the rest.
        _assert_same_run(resumed, whole, steps=range(step + 1, step + 3), buffers=False)


def test_batchnorm_groups_of_two_on_four_torch_ranks(tmp_path):
    proc = _run(TORCHRUN + ["4", str(REPO / "tests" / "scripts" / "group_batchnorm.py"),
                            str(tmp_path)], timeout=300)
    _ok(proc)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text())["2"] for r in range(4)]
    assert [r["members"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for result in results:
        assert result["bn_types"] == ["GroupBatchNorm2d"]
        for step in result["steps"]:
            assert step["output"] <= 1e-5 * max(1.0, step["output_scale"])
            assert step["input_grad"] <= 1e-5
            assert step["param_grad"] <= 1e-5 * max(1.0, step["param_grad_scale"])
        assert result["running"] <= 1e-5 and result["eval_output"] <= 1e-5
        assert result["batches_tracked"] == [2, 2]
    means = [torch.tensor(r["running_mean"]) for r in results]
    assert torch.equal(means[0], means[1]) and torch.equal(means[2], means[3])
    assert (means[0] - means[2]).abs().max() > 1e-3


# -- launches and configs that are refused with one line ------------------------------------

def test_elastic_is_horovod_only(tiny_root, tmp_path):
    proc = _run([sys.executable] + _train_args(
        f"data.root={tiny_root}", f"output_dir={tmp_path}", "--engine", "torch",
        "train.elastic=true", "train.global_batch_size=4"), timeout=120)
    assert proc.returncode == 2
    assert "train.elastic: is Horovod-only" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_unknown_engine_exits_2(tiny_root, tmp_path):
    proc = _run([sys.executable] + _train_args(f"data.root={tiny_root}",
                                               f"output_dir={tmp_path}", "dist.engine=mpi"))
    assert proc.returncode == 2
    assert "dist.engine: 'mpi' is not one of horovod, torch" in proc.stderr


def test_horovod_engine_without_horovod_says_how_to_install_or_switch(tiny_root, tmp_path):
    # A horovod package that cannot be imported, ahead of the installed one on the path.
    fake = tmp_path / "fake" / "horovod"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('no Horovod in this test')\n")
    proc = subprocess.run([sys.executable] + _train_args(
        f"data.root={tiny_root}", f"output_dir={tmp_path / 'out'}"), capture_output=True,
        text=True, cwd=REPO, timeout=120,
        env=_env(PYTHONPATH=f"{fake.parent}{os.pathsep}{REPO}"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "horovod.torch cannot be imported" in lines[0] and "dist.engine=torch" in lines[0]


def test_torch_engine_under_a_launcher_it_does_not_read_exits_2(tiny_root, tmp_path):
    proc = _run([sys.executable] + _train_args(
        f"data.root={tiny_root}", f"output_dir={tmp_path}", "--engine", "torch"),
        timeout=120, OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2")
    assert proc.returncode == 2
    assert "torchrun" in proc.stderr and "Traceback" not in proc.stderr


def test_slurm_rendezvous_from_srun_variables():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_JOB_NODELIST": "cn[017-020,031],gpu2", "SLURM_JOB_ID": "123456"}
    assert rendezvous(env) == ("tcp://cn017:32956", 3, 8, 1, 0)
    assert rendezvous(dict(env, MASTER_PORT="4000"))[0] == "tcp://cn017:4000"
    assert _first_host("gpu2,gpu3") == "gpu2"
    # torchrun's variables win over Slurm's (torchrun started inside an allocation).
    torchrun_env = dict(env, TORCHELASTIC_RUN_ID="x", RANK="1", WORLD_SIZE="2", LOCAL_RANK="1",
                        LOCAL_WORLD_SIZE="2")
    assert rendezvous(torchrun_env) == ("env://", 1, 2, 1, 2)
    assert rendezvous({}) is None


# -- launch scripts ----------------------------------------------------------------------------

def test_workstation_script_with_engine_torch_stages_and_trains(tiny_root, tmp_path):
    # torchrun for both steps: `climseg stage` reads torchrun's rank variables, the trainer
    # runs the torch engine; no horovodrun involved.
    out, staged = tmp_path / "run", tmp_path / "staged"
    env = _env(DATA=str(tiny_root), NGPUS="2", CONFIG="yaml/ci.yaml", STAGE_DIR=str(staged),
               OUTPUT=str(out), ENGINE="torch")
    proc = subprocess.run(["bash", "jobs/workstation.sh", "train.max_steps=2"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    _ok(proc)
    assert (staged / "train" / "index.txt").is_file()
    assert sorted(losses(out)) == [1, 2]
    assert "dist:\n  engine: torch" in (out / "config.yaml").read_text()


def test_workstation_script_rejects_an_unknown_engine(tmp_path):
    proc = subprocess.run(["bash", "jobs/workstation.sh"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env=_env(DATA=str(tmp_path), ENGINE="mpi"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "workstation.sh: ENGINE=mpi: expected horovod or torch"


# -- the tools under torchrun ------------------------------------------------------------------

def test_evaluate_under_torchrun_matches_one_process(runs, tiny_root, tmp_path):
    from climseg import evaluate

    _, path = step_checkpoints(runs["torch"])[-1]
    out = tmp_path / "two.json"
    _ok(_run(TORCHRUN + ["2", "-m", "climseg.evaluate", "--checkpoint", str(path), "--data",
                         str(tiny_root), "--batch-size", "1", "--output", str(out)]))
    two = json.loads(out.read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' kernels, for bit-identical logits
    try:
        one = evaluate.score(path, tiny_root, batch_size=1)
    finally:
        torch.set_num_threads(threads)
    assert two["ranks"] == 2 and two["samples"] == one["samples"]
    assert two["confusion"] == one["confusion"]


def test_summarize_under_torchrun_matches_one_process(tiny_root, tmp_path):
    import h5py

    root = tmp_path / "root"
    shutil.copytree(tiny_root / "train", root / "train")
    _ok(_run(TORCHRUN + ["2", "-m", "climseg", "summarize", "--data", str(root)], timeout=300))
    with h5py.File(tiny_root / "stats.h5") as one, h5py.File(root / "stats.h5") as two:
        names = []
        one.visit(names.append)
        datasets = [n for n in names if isinstance(one[n], h5py.Dataset)]
        assert datasets
        for name in datasets:
            a, b = one[name][()], two[name][()]
            assert a.shape == b.shape and ((a == b) | (abs(a - b) <= 1e-9 * abs(a))).all(), name

"""``train.elastic``: a run that survives a lost rank under Horovod elastic (docs/elastic.md).

What makes it possible is checked first without Horovod: the loader's rank shares of one global
order and the accumulation that keeps the global batch. Then the trainer: one rank elastic is
the plain run exactly, and a two-rank elastic run whose rank 0 is killed rolls back, goes on
alone, takes a rejoining rank back and finishes with the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from climseg.checkpoint import load_checkpoint, step_checkpoints
from climseg.config import ConfigError, load_config
from climseg.data.loader import BatchLoader
from climseg.data.partition import list_files
from conftest import require_horovod, wait_for
from exact import EXACT, assert_same_losses, assert_same_training_across_ranks

# Ranks or training in (nearly) every test: out of make test-fast, and the launcher guard's
# multiprocess mark (tests/conftest.py).
pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "yaml" / "ci.yaml"
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
HOROVODRUN = Path(sys.executable).parent / "horovodrun"
# Global batch 4 of single samples: 4 micro-batches on one rank, 2 on each of two. Every run
# here trains with SGD in fp32 (exact.EXACT): runs on different rank counts agree to exact.REL
# on the first two steps, within the measured noise after (exact's docstring).
#
# The reference width, not ci.yaml's narrow model: the killed rank's host must come back from
# its blacklist cooldown (5-10 s) while the survivor still trains, and 24 narrow steps take
# about as long.
WIDTH = "model.width=1"
ELASTIC = ["train.elastic=true", "train.global_batch_size=4", "train.local_batch_size=1",
           "train.validation_frequency=8", "train.log_frequency=1", WIDTH, *EXACT]
STEPS = 24
END = STEPS + 3   # where the runs resumed from the elastic run's checkpoint stop
ROLLED_BACK = 5   # the commit the killed run goes back to (the survived fixture)


# -- the pieces --------------------------------------------------------------------------------

def _loader(files, share, batch=1, crop=(32, 48)):
    return BatchLoader(files, batch, shift=np.zeros(16), scale=np.ones(16), crop=crop,
                       random_crop=True, seed=5, share=share)


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_rank_shares_of_each_global_batch_make_the_one_global_order(tiny_root, ranks):
    files = list_files(tiny_root / "train")
    global_batch = 4
    whole = _loader(files, (0, 1, global_batch)).plan(epoch=3)
    shares = [_loader(files, (r, ranks, global_batch)).plan(epoch=3) for r in range(ranks)]
    per_rank = global_batch // ranks
    steps = len(files) // global_batch
    assert len(whole) == steps * global_batch
    for s in range(steps):
        # Rank r takes samples r, r + ranks, ... of each global batch; crops come with them.
        step = [share[s * per_rank:(s + 1) * per_rank] for share in shares]
        got = sorted(x for part in step for x in part)
        assert got == sorted(whole[s * global_batch:(s + 1) * global_batch])
        for r in range(ranks):
            assert step[r] == whole[s * global_batch + r:(s + 1) * global_batch:ranks]
    assert len(_loader(files, (ranks - 1, ranks, global_batch))) == steps * per_rank


def test_one_rank_share_is_the_plain_loaders_order(tiny_root):
    files = list_files(tiny_root / "train")
    plain = BatchLoader(files, 2, shift=np.zeros(16), scale=np.ones(16), crop=(32, 48),
                        random_crop=True, seed=5)
    assert _loader(files, (0, 1, 4), batch=2).plan(2) == plain.plan(2)[:len(files) // 4 * 4]


def test_elastic_config_keeps_the_global_batch(tmp_path):
    cfg = load_config(CI, ["data.root=/x", *ELASTIC])
    assert [cfg.elastic_accumulation(n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError, match="train.global_batch_size: .4. is not a multiple of "
                                          "3 ranks"):
        cfg.elastic_accumulation(3)
    with pytest.raises(ConfigError, match="train.global_batch_size: is required with "
                                          "train.elastic"):
        load_config(CI, ["data.root=/x", "train.elastic=true"])
    with pytest.raises(ConfigError, match="train.batchnorm_group_size: must be 1"):
        load_config(CI, ["data.root=/x", *ELASTIC, "train.batchnorm_group_size=2"])


# -- the trainer -------------------------------------------------------------------------------

def _cmd(root: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "climseg.train", "--config", str(CI), f"data.root={root}",
            f"output_dir={out}", WIDTH, *overrides]


def _passes(out: Path) -> dict[int, list[float]]:
    """Each step's losses in the order logged: two where a roll-back redid the step."""
    passes: dict[int, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["kind"] == "train":
            passes.setdefault(row["step"], []).append(row["loss"])
    return passes


def _losses(out: Path) -> dict[int, float]:
    """Each step's loss; a step redone after a roll-back counts with its last value."""
    return {step: passes[-1] for step, passes in _passes(out).items()}


def uninterrupted_run(root: Path, out: Path, steps: int, env: dict[str, str] = ENV) -> Path:
    """The plain run an elastic one must reproduce: one process, 4 micro-batches of 1."""
    proc = subprocess.run(_cmd(root, out, "train.gradient_accumulation=4",
                               "train.local_batch_size=1", "train.validation_frequency=8",
                               f"train.max_steps={steps}", *EXACT),
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_root, tmp_path_factory) -> Path:
    return uninterrupted_run(tiny_root, tmp_path_factory.mktemp("uninterrupted"), END)


def assert_finished_like_uninterrupted(out: Path, text: str, reference: Path,
                                       steps: int) -> None:
    """Every step once (the steps after a commit are redone), with the losses of the
    uninterrupted run: the global order and batch do not depend on the rank count, only the
    order of float additions does (exact.assert_same_training_across_ranks); the final
    checkpoint, and no traceback from any rank."""
    got = _losses(out)
    assert sorted(got) == list(range(1, steps + 1))
    assert_same_training_across_ranks(got, _losses(reference), range(1, steps + 1))
    ((step, path),) = step_checkpoints(out)
    assert step == steps and load_checkpoint(path)["step"] == steps
    ranks_lines = [line for line in text.splitlines() if line.startswith("[")]
    assert not any("Traceback" in line for line in ranks_lines), text[-4000:]


@pytest.fixture(scope="module")
def one_rank(tiny_root, tmp_path_factory) -> Path:
    """Four steps of an elastic run in one process (not under horovodrun)."""
    out = tmp_path_factory.mktemp("one_rank")
    proc = subprocess.run(_cmd(tiny_root, out, *ELASTIC, "train.max_steps=4"),
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.elastic: not launched by horovodrun in elastic mode" in proc.stderr
    return out


def test_one_rank_elastic_run_is_the_plain_run(one_rank, uninterrupted):
    # The same micro-batches summed in the same order: equal to the last bit.
    expected = _losses(uninterrupted)
    assert _losses(one_rank) == {s: expected[s] for s in range(1, 5)}


def _two_ranks(root: Path, out: Path, *overrides: str) -> None:
    """Two ranks under a plain ``horovodrun -np 2`` (no elastic driver): the rank shares of
    the elastic order, 2 micro-batches of 1 each."""
    require_horovod()
    cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo",
           *_cmd(root, out, *ELASTIC, "train.max_steps=4", *overrides)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_ranks_with_accumulation_2_train_as_one_process_with_accumulation_4(
        tiny_root, tmp_path, one_rank):
    # Rank r takes samples r and r + 2 of each global batch of 4 and accumulates them; the
    # allreduce adds the two ranks' sums. One process adds the same four per-sample gradients
    # in another order: steps 1 and 2 agree to rounding, later ones within the measured noise
    # (exact's docstring; the final weights then differ by more than any useful tolerance:
    # 8 steps left a batch-norm bias 110 % off, relative to its norm).
    _two_ranks(tiny_root, tmp_path)
    assert_same_training_across_ranks(_losses(tmp_path), _losses(one_rank), range(1, 5))


def test_staged_per_rank_data_is_refused(tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    names = sorted(p.name for p in (root / "train").glob("data-*.h5"))
    (root / "train" / names[0]).unlink()  # as if staged for another node's ranks
    (root / "train" / "index.txt").write_text("\n".join(names) + "\n")
    proc = subprocess.run(_cmd(root, tmp_path / "out", *ELASTIC, "train.max_steps=1"),
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"{root / 'train'}: 1 of {len(names)} files are not here" in proc.stderr
            and "train.elastic needs every file on every node" in proc.stderr)
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("settings, message", [
    ({"HOSTS": "node1"}, "HOSTS entry 'node1' is not host:slots"),
    ({"HOSTS": "a:1 b:1", "NP": "3"}, "need MIN_NP (1) <= NP (3) <= the slots of HOSTS (2)"),
    ({"HOSTS": "a:1", "DATA": "/nonexistent"}, "DATA=/nonexistent is not a folder"),
    ({"HOSTS": "a:2", "CONFIG": "nope.yaml"}, "CONFIG=nope.yaml not found"),
])
def test_elastic_script_refuses_bad_settings_in_one_line(tiny_root, tmp_path, settings, message):
    env = {**ENV, "DATA": str(tiny_root), "OUTPUT": str(tmp_path / "out"), **settings}
    proc = subprocess.run(["bash", str(REPO / "jobs" / "elastic.sh")], capture_output=True,
                          text=True, cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == f"elastic.sh: {message}"


def _members(text: str) -> list[tuple[int, int, int, int]]:
    """(rank, ranks, pid, step) of every 'elastic: rank r of n' line, in order."""
    found = re.findall(r"elastic: rank (\d+) of (\d+) \(host \S+, pid (\d+)\) at step (\d+)",
                       text)
    return [tuple(int(v) for v in m) for m in found]


def _start_elastic(root: Path, out: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """jobs/elastic.sh with two ranks on two host names of this machine (Horovod blacklists a
    whole host when one of its ranks fails)."""
    env = dict(ENV, DATA=str(root), HOSTS="localhost:1 127.0.0.1:1", OUTPUT=str(out),
               CONFIG=str(CI), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               HOROVODRUN_ARGS="--network-interfaces lo --blacklist-cooldown-range 5 10")
    cmd = ["bash", str(REPO / "jobs" / "elastic.sh"), *ELASTIC, *overrides]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                            env=env)


def _kill_a_rank(root: Path, out: Path, log: Path, rank: int, after_step: int,
                 *overrides: str) -> tuple[str, int]:
    """Start a two-rank elastic run, SIGKILL its rank ``rank`` once step ``after_step`` is
    logged, and wait for the job's end: (its output, horovodrun's status)."""
    proc = _start_elastic(root, out, log, *overrides)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists()
                  and max(_losses(out), default=0) >= after_step, proc, log)
        (pid,) = [pid for r, _, pid, _ in _members(log.read_text()) if r == rank]
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    return log.read_text(), proc.returncode


@pytest.fixture(scope="module")
def survived(tiny_root, tmp_path_factory) -> tuple[Path, str, int]:
    """A two-rank elastic run whose rank 0 is killed with SIGKILL once step 6 is logged.
    Commits every 5 steps: the roll-back goes to step 5 (step 10 would take four more steps
    before the kill lands), inside an epoch (16 samples, global batch 4: epochs end at steps
    4, 8, ...), so the redone steps must take up the epoch's order where the commit left it."""
    require_horovod()
    base = tmp_path_factory.mktemp("elastic")
    out = base / "out"
    text, returncode = _kill_a_rank(tiny_root, out, base / "run.log", 0, ROLLED_BACK + 1,
                                    f"train.max_steps={STEPS}",
                                    f"train.elastic_commit_frequency={ROLLED_BACK}")
    return out, text, returncode


def test_elastic_run_survives_losing_rank_0_and_takes_a_rank_back(survived, uninterrupted):
    out, text, returncode = survived
    assert returncode == 0, text[-4000:]
    back = re.search(r"elastic: a rank was lost; back to the commit at step (\d+)", text)
    assert back and int(back[1]) == ROLLED_BACK, text  # inside an epoch (the fixture's docstring)
    # The first redone step against its own first pass, exactly: the same weights (the commit,
    # restored to the bit) and, if the roll-back took up the epoch where the commit left it, the
    # same four samples, each with the same forward pass on one rank as on two; only the order
    # of the loss's sum differs. Another place in the epoch means other samples.
    first, *_, redone = _passes(out)[ROLLED_BACK + 1]
    assert_same_losses({0: redone}, {0: first}, [0])
    members = _members(text)
    # Two ranks, then the survivor alone as rank 0 (it took over the lock and the reports),
    # then two again once the killed rank's host came back from its cooldown.
    sizes = [ranks for _, ranks, _, _ in members]
    assert sizes[:2] == [2, 2] and 1 in sizes and sizes[-1] == 2, members
    first_pid0 = next(pid for rank, _, pid, _ in members if rank == 0)
    alone = next(m for m in members if m[1] == 1)
    assert alone[0] == 0 and alone[2] != first_pid0
    assert_finished_like_uninterrupted(out, text, uninterrupted, STEPS)


def test_a_rank_lost_before_the_first_commit_rolls_back_to_the_resumed_step(
        tiny_root, survived, uninterrupted, tmp_path):
    """A resumed elastic run whose rank is lost before it commits goes back to the checkpoint
    it resumed from, not to the fresh model it was built with."""
    out, _, returncode = survived
    assert returncode == 0
    ((step, path),) = step_checkpoints(out)
    resumed = tmp_path / "out"
    resumed.mkdir()
    os.link(path, resumed / path.name)  # the checkpoint only, not the run's lock or logs
    assert step == STEPS
    text, returncode = _kill_a_rank(tiny_root, resumed, tmp_path / "run.log", 1, step + 1,
                                    f"train.max_steps={END}",
                                    "train.elastic_commit_frequency=100")
    assert returncode == 0, text[-4000:]
    assert f"elastic: a rank was lost; back to the commit at step {step}" in text, text[-4000:]
    got = _losses(resumed)
    assert sorted(got) == list(range(step + 1, END + 1))
    assert_same_training_across_ranks(got, _losses(uninterrupted), range(step + 1, END + 1))


def test_elastic_checkpoint_resumes_on_another_rank_count(tiny_root, survived, uninterrupted):
    out, _, returncode = survived
    assert returncode == 0
    proc = subprocess.run(_cmd(tiny_root, out, *ELASTIC, f"train.max_steps={END}",
                               "resume=auto"),
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training_across_ranks(_losses(out), _losses(uninterrupted),
                                      range(STEPS + 1, END + 1))
    # A plain run cannot continue it: its data order is not the elastic one.
    refused = subprocess.run(_cmd(tiny_root, out, "resume=auto", *EXACT,
                                  f"train.max_steps={END + 2}"),
                             capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    assert refused.returncode == 2
    assert "written with train.elastic=True train.global_batch_size=4" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert load_checkpoint(step_checkpoints(out)[-1][1])["step"] == END

"""What a resume checks, and one run per output folder (issue 18, items 1 and 2).

A resume on another model, data set, statistics, normalization or optimizer is refused in one
line naming the key, with exit 2, before anything in ``output_dir`` changes (every file's hash
compared); the same data under another path resumes. A fresh run into a folder that holds
another run's checkpoints is refused the same way; ``--force`` moves the old run aside.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from climseg.checkpoint import load_checkpoint, step_checkpoints
from climseg.data.split import split_dataset
from climseg.data.summarize import summarize_split
from climseg.data.synthetic import generate_dataset
from conftest import TINY_HEIGHT, TINY_WIDTH, require_horovod

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "yaml" / "ci.yaml"
HOROVODRUN = Path(sys.executable).parent / "horovodrun"
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# Two steps, no validation: a checkpoint at step 2 in seconds.
SHORT = ["train.max_steps=2", "train.validation_frequency=0", "train.log_frequency=1"]
START_OVER = ("or start over (resume=none overwrite=true moves the old run to a dated folder "
              "beside it, or another output_dir)")
DATA_FIX = ("point data.root (and data.stats_file) at the data set the run trained on; the "
            "same files under another path are fine")
pytestmark = pytest.mark.slow  # every test trains


def _train(root: Path, out: Path, *overrides: str, force: bool = False):
    cmd = [sys.executable, "-m", "climseg.train", "--config", str(CI), f"data.root={root}",
           f"output_dir={out}", *SHORT, *overrides] + (["--force"] if force else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)


def _hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(proc) -> str:
    """The one error line of a refused run (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
    return line.split("error: ", 1)[1]


def _train_steps(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def first_run(tiny_root, tmp_path_factory) -> Path:
    """A finished two-step run (its checkpoint: step 2)."""
    out = tmp_path_factory.mktemp("first") / "run"
    proc = _train(tiny_root, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(first_run, tmp_path) -> Path:
    """The first run's folder, copied: a test may resume in it."""
    out = tmp_path / "run"
    shutil.copytree(first_run, out)
    return out


@pytest.fixture(scope="module")
def other_root(tmp_path_factory) -> Path:
    """Another data set: other samples, other files, other statistics."""
    base = tmp_path_factory.mktemp("other_data")
    generate_dataset(base / "raw", 24, 11, height=TINY_HEIGHT, width=TINY_WIDTH, progress=False)
    split_dataset(base / "raw", base / "root")
    summarize_split(base / "root", "train", progress=False)
    return base / "root"


def _ckpt(out: Path) -> Path:
    return step_checkpoints(out)[-1][1]


# -- item 1: a resume checks what it resumes -------------------------------------------------

@pytest.mark.parametrize("overrides, then_now, fix", [
    (["model.num_classes=4", "model.class_names=[a,b,c,d]",
      "loss.class_frequencies=[0.25,0.25,0.25,0.25]"],
     "model.num_classes=3, this run has 4", "set model.num_classes=3"),
    (["data.channels=[0,1,2]"],
     "data.channels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], this run has "
     "[0, 1, 2]",
     "set data.channels=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]"),
    (["optimizer.name=adamw"], "optimizer.name=lamb, this run has adamw",
     "set optimizer.name=lamb"),
    (["data.normalization=zscore"], "data.normalization=minmax, this run has zscore",
     "set data.normalization=minmax"),
])
def test_resume_on_another_model_or_optimizer_is_one_line_and_changes_nothing(
        tiny_root, run_copy, overrides, then_now, fix):
    before = _hashes(run_copy)
    proc = _train(tiny_root, run_copy, "resume=auto", *overrides)
    assert _error_line(proc) == (f"resume: {_ckpt(run_copy)} was written with {then_now}: a "
                                 f"resumed run must match; {fix}, {START_OVER}")
    assert _hashes(run_copy) == before


def test_resume_on_another_data_set_or_stats_file_is_refused(tiny_root, other_root, run_copy):
    before = _hashes(run_copy)
    line = _error_line(_train(other_root, run_copy, "resume=auto"))
    assert line.startswith(f"resume: {_ckpt(run_copy)} was written with data.stats=sha256 ")
    assert ", data.train_files=16 files (sha256 " in line and "; this run has data.stats=" in line
    assert line.endswith(f"a resumed run must match; {DATA_FIX}, {START_OVER}"), line
    # The run's own files with another statistics file: only the stats differ.
    line = _error_line(_train(tiny_root, run_copy, "resume=auto",
                              f"data.stats_file={other_root / 'stats.h5'}"))
    assert "data.stats=sha256 " in line and "files" not in line.split(": a resumed")[0], line
    # One training file fewer under the same path.
    fewer = run_copy.parent / "fewer"
    shutil.copytree(tiny_root, fewer)
    sorted((fewer / "train").glob("data-*.h5"))[-1].unlink()
    line = _error_line(_train(fewer, run_copy, "resume=auto"))
    assert "data.train_files=16 files (sha256 " in line and "this run has 15 files (sha256 " in line
    assert _hashes(run_copy) == before


def test_the_same_data_under_another_path_resumes(tiny_root, run_copy, tmp_path):
    restaged = tmp_path / "restaged"  # a copy (the tiny train files are symlinks: now files)
    shutil.copytree(tiny_root, restaged)
    proc = _train(restaged, run_copy, "resume=auto", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_copy / 'ckpt-step00000002.pt'} at step 2" in proc.stderr
    assert _train_steps(run_copy) == [1, 2, 3]
    # ... and again from the copy's copy: the checkpoint of step 3 records the same data.
    moved = tmp_path / "moved"
    restaged.rename(moved)
    proc = _train(moved, run_copy, "resume=auto", "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_checkpoint_from_before_the_check_resumes_with_a_warning(tiny_root, run_copy):
    path = _ckpt(run_copy)
    state = load_checkpoint(path)
    del state["identity"]
    torch.save(state, path)
    proc = _train(tiny_root, run_copy, "resume=auto", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"resume: {path} was written before climseg recorded its data's fingerprints: "
            "data.stats, data.train_files, data.validation_files could not be checked "
            "(resuming)") in proc.stderr


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line_not_a_traceback(tiny_root,
                                                                               run_copy):
    """The last guard, for what no recorded key catches (here an old checkpoint whose config
    was edited): load_state_dict's error, in the ranks' agreement."""
    path = _ckpt(run_copy)
    state = load_checkpoint(path)
    del state["identity"]
    state["config"]["model"].update(num_classes=4, class_names=list("abcd"))
    torch.save(state, path)
    before = _hashes(run_copy)
    proc = _train(tiny_root, run_copy, "resume=auto", "model.num_classes=4",
                  "model.class_names=[a,b,c,d]", "loss.class_frequencies=[0.25,0.25,0.25,0.25]")
    line = _error_line(proc)
    assert line.startswith(f"resume: {path}: the checkpoint does not fit this run's model or "
                           "optimizer (Error(s) in loading state_dict"), line
    assert "size mismatch" in line
    assert _hashes(run_copy) == before


@pytest.mark.multiprocess
def test_two_ranks_refuse_a_mismatch_with_the_same_line(tiny_root, run_copy):
    """Rank 0 reads the checkpoint; rank 1 learns of the refusal through the agreement and
    exits 2 with the same line."""
    require_horovod()
    before = _hashes(run_copy)
    cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
           "climseg.train", "--config", str(CI), f"data.root={tiny_root}",
           f"output_dir={run_copy}", *SHORT, "resume=auto", "optimizer.name=adamw"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    lines = [ln for ln in text.splitlines() if "error: resume:" in ln]
    assert sorted(ln[:3] for ln in lines) == ["[0]", "[1]"], text[-3000:]
    assert all("optimizer.name=lamb, this run has adamw" in ln for ln in lines)
    assert "Traceback" not in text and "status code 1." not in text, text[-3000:]
    assert _hashes(run_copy) == before


# -- item 2: a folder belongs to one run -----------------------------------------------------

def test_a_fresh_run_into_another_runs_folder_is_refused_and_changes_nothing(tiny_root,
                                                                            run_copy):
    before = _hashes(run_copy)
    line = _error_line(_train(tiny_root, run_copy))
    assert line == (f"output_dir: {run_copy} holds another run's checkpoints "
                    "(ckpt-step00000002.pt, best.pt); resume=auto to continue it, or "
                    "overwrite=true (train --force) to start over: the old run is moved aside "
                    f"to {run_copy}.replaced-YYYYmmdd-HHMMSS")
    assert _hashes(run_copy) == before


def test_force_moves_the_old_run_aside_and_starts_over(tiny_root, run_copy):
    before = _hashes(run_copy)
    proc = _train(tiny_root, run_copy, force=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (aside,) = run_copy.parent.glob("run.replaced-*")
    assert f"the previous run in {run_copy} " in proc.stderr and str(aside) in proc.stderr
    # The old run whole beside it (its lock file stays: this run held it), the new one fresh.
    assert _hashes(aside) == {k: v for k, v in before.items() if k != ".climseg.lock"}
    assert _train_steps(run_copy) == [1, 2]
    assert (run_copy / "mlperf.log").exists() and not (run_copy / "mlperf-2.log").exists()


def test_a_run_from_a_checkpoint_of_its_own_folder_is_not_another_run(tiny_root, run_copy):
    proc = _train(tiny_root, run_copy, f"resume={_ckpt(run_copy)}", "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]

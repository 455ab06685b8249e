"""Every fault of docs/reliability.md against the real trainer: tiny data, yaml/ci.yaml, one
process or two ranks under ``horovodrun -np 2 --gloo``, each run bounded in time.

The two-rank runs share one uninterrupted reference run (``reference``); a stopped or killed
run resumed with ``resume=auto`` must reproduce its losses step for step. They train on
``resume_root``, whose epoch is as long as the reference run, so that every stop or kill
before its end falls inside an epoch.
"""

from __future__ import annotations

import contextlib
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
from climseg.data.format import read_sample, write_sample
from climseg.data.partition import list_files
from climseg.data.split import split_dataset
from climseg.data.summarize import summarize_split
from climseg.data.synthetic import generate_dataset
from conftest import TINY_HEIGHT, TINY_SEED, TINY_WIDTH, require_horovod, wait_for
from exact import EXACT, assert_same_losses, assert_same_weights

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "yaml" / "ci.yaml"
HOROVODRUN = Path(sys.executable).parent / "horovodrun"
# Every test runs the trainer in a subprocess (the two-rank ones are also marked multiprocess).
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]  # every test here launches ranks or trains
REFERENCE_STEPS = 8
# Validation every 4 steps on 2 samples: evaluations (and so best.pt) on both sides of a resume.
COMMON = ["train.log_frequency=1", "train.validation_frequency=4"]
# Unbuffered: horovodrun's own status lines and the ranks' lines reach the log whole.
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(out) if r["kind"] == "train"}


def _train_cmd(root: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "climseg.train", "--config", str(CI), f"data.root={root}",
            f"output_dir={out}", *overrides]


def _train(root: Path, out: Path, *overrides: str, timeout: int = 300):
    """One process; returns the finished process (stdout, stderr as text)."""
    return subprocess.run(_train_cmd(root, out, *overrides), capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=timeout)


def _hvd_cmd(root: Path, out: Path, *overrides: str) -> list[str]:
    require_horovod()
    return [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo",
            *_train_cmd(root, out, *COMMON, *overrides)]


def _hvd_train(root: Path, out: Path, *overrides: str, timeout: int = 600):
    return subprocess.run(_hvd_cmd(root, out, *overrides), capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=timeout)


def _hvd_start(root: Path, out: Path, log: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(_hvd_cmd(root, out, *overrides), stdout=log.open("w"),
                            stderr=subprocess.STDOUT, cwd=REPO, env=ENV)


def _rank_pid(out: Path, rank: int) -> int:
    """The pid of the trainer of ``rank`` writing to ``out`` (found by its command line and
    Horovod's environment: horovodrun does not say)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"climseg.train" in cmd and f"output_dir={out}".encode() in cmd
                and f"HOROVOD_RANK={rank}".encode() in env):
            return int(entry.name)
    raise AssertionError(f"no rank {rank} process for {out}")


def _train_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return sum('"train"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def _rank_lines(text: str) -> list[str]:
    """What the ranks printed (horovodrun prefixes their lines with [rank])."""
    return [line for line in text.splitlines() if line.startswith("[")]


def _assert_continues(resumed: Path, reference: Path, from_step: int) -> None:
    """The resumed run has every step's loss and the final weights of the uninterrupted one,
    to exact.REL (both are SGD runs on the same ranks: see exact.EXACT)."""
    steps = range(from_step + 1, REFERENCE_STEPS + 1)
    assert steps, "stopped too late to compare"
    assert_same_losses(_losses(resumed), _losses(reference), steps)
    # The parameters to REL; not the batch-norm running statistics: each rank keeps its own,
    # a checkpoint holds rank 0's, and a resume gives every rank rank 0's (measured in a
    # fresh-clone CI run: 0.1-0.9 % apart after the resume, the parameters within REL).
    assert_same_weights(resumed, reference, buffers=False)


def _assert_first_exit_is(returncode: int, text: str, code: str) -> None:
    """The first rank to end exited with ``code`` and no rank printed a traceback.

    Which rank ends first, and how the other one ends, are races: once one rank exits non-zero,
    horovodrun terminates those still running, perhaps before their own exit. Only the first
    status horovodrun prints is a rank's own (it terminates the others after printing it).
    """
    statuses = re.findall(r"Process \d exit with status code (\d+)\.", text)
    assert returncode != 0 and statuses and statuses[0] == code, text[-3000:]
    assert not any("Traceback" in line for line in _rank_lines(text)), text[-3000:]


@pytest.fixture(scope="module")
def resume_root(tmp_path_factory) -> Path:
    """Tiny data with 32 training files: at 2 ranks x train.local_batch_size 2 (yaml/ci.yaml)
    an epoch is REFERENCE_STEPS steps. A run stopped before step 8 (the tests assert it) is then
    inside an epoch, and its resume must take the epoch's order up where it stopped: a resume
    that read the epoch from its start again would train on other samples. (On the 16 files of
    tiny_root, a stop that landed on step 4, an epoch's end, could not tell the two apart.)"""
    base = tmp_path_factory.mktemp("resume_data")
    generate_dataset(base / "raw", 36, TINY_SEED, height=TINY_HEIGHT, width=TINY_WIDTH,
                     progress=False)
    root = base / "root"
    assert split_dataset(base / "raw", root, fractions=(32 / 36, 2 / 36, 2 / 36)) == {
        "train": 32, "validation": 2, "test": 2}
    summarize_split(root, "train", progress=False)
    return root


@pytest.fixture(scope="module")
def reference(horovod, resume_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    proc = _hvd_train(resume_root, out, f"train.max_steps={REFERENCE_STEPS}", *EXACT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def stopped(resume_root, tmp_path_factory) -> tuple[Path, str]:
    """A two-rank SGD run (exact.EXACT) sent SIGTERM on rank 1 only, once it has logged its
    first step."""
    out = tmp_path_factory.mktemp("stopped")
    log = out.parent / f"{out.name}.log"
    proc = _hvd_start(resume_root, out, log, "train.max_steps=200", *EXACT)
    try:
        wait_for(lambda: _train_rows(out) >= 1, proc, log)
        os.kill(_rank_pid(out, 1), signal.SIGTERM)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, log.read_text()


# -- time limits, preemption ----------------------------------------------------------------

def test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint(stopped):
    out, text = stopped
    # Every rank stops at the same step, after the checkpoint, with the "stopped, resumable"
    # status and no traceback. (The first rank to exit 3 makes horovodrun terminate the
    # others: which rank's 3 it prints is a race, but by then every rank has said it stopped.)
    ((step, path),) = step_checkpoints(out)
    line = f"stopped by SIGTERM (1 of 2 ranks) at step {step}; checkpoint {path}"
    assert sorted(r[:3] for r in _rank_lines(text) if line in r) == ["[0]", "[1]"], text[-3000:]
    assert "exit with status code 3." in text
    assert not any("Traceback" in line for line in _rank_lines(text)), text[-3000:]
    assert load_checkpoint(path)["step"] == step


def test_stopped_run_resumes_with_the_losses_of_an_uninterrupted_run(resume_root, stopped,
                                                                      reference):
    out, _ = stopped
    ((step, _),) = step_checkpoints(out)
    assert step < REFERENCE_STEPS
    proc = _hvd_train(resume_root, out, f"train.max_steps={REFERENCE_STEPS}", "resume=auto",
                      *EXACT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_continues(out, reference, step)
    # best.pt is the best evaluation of both segments together.
    evals = [r["mean_iou"] for r in _metrics(out) if r["kind"] == "eval"]
    assert load_checkpoint(out / "best.pt")["best_iou"] == max(evals)


def test_kill_9_of_one_rank_then_resume_auto_continues_identically(resume_root, tmp_path,
                                                                   reference):
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    proc = _hvd_start(resume_root, out, log, "train.max_steps=200", "train.save_frequency=2",
                      *EXACT)
    try:
        wait_for(lambda: bool(step_checkpoints(out)) and _train_rows(out) >= 3, proc, log)
        os.kill(_rank_pid(out, 1), signal.SIGKILL)
        # The job ends, nobody hangs: a generous bound that only a hung run reaches.
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    step = step_checkpoints(out)[-1][0]
    proc = _hvd_train(resume_root, out, f"train.max_steps={REFERENCE_STEPS}", "resume=auto",
                      *EXACT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_continues(out, reference, step)
    # A temporary left by rank 0 killed mid-write would have been removed by the resume.
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]


def test_ctrl_c_on_horovodrun_saves_and_the_run_resumes_identically(resume_root, tmp_path,
                                                                    reference):
    """SIGINT to horovodrun itself (a Ctrl-C): it sends each rank SIGTERM and waits for them
    (tools/patch_horovod.py); every rank stops at the same step, rank 0 saves, exit 3."""
    out, log = tmp_path / "interrupted", tmp_path / "interrupted.log"
    proc = _hvd_start(resume_root, out, log, "train.max_steps=200", *EXACT)
    try:
        wait_for(lambda: _train_rows(out) >= 1, proc, log)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    ((step, path),) = step_checkpoints(out)
    line = f"stopped by SIGTERM (2 of 2 ranks) at step {step}; checkpoint {path}"
    assert sorted(r[:3] for r in _rank_lines(text) if line in r) == ["[0]", "[1]"], text[-3000:]
    # Before the first validation (train.validation_frequency=4) there is no score to print.
    assert ("(stopped by SIGTERM (2 of 2 ranks)); no validation yet" in text) == (step < 4)
    assert "IoU nan" not in text
    # Each rank said it exits 3 (the line above); horovodrun's own status lines, where its
    # buffered stdout kept them whole, must agree: no rank was killed.
    assert set(re.findall(r"Process \d exit with status code (-?\d+)\.", text)) <= {"3"}, \
        text[-3000:]
    # And horovodrun says that they all stopped, with their status (tools/patch_horovod.py).
    assert proc.returncode == 3, text[-3000:]
    assert "horovodrun: stopped: all 2 processes exited with status 3" in text, text[-3000:]
    proc = _hvd_train(resume_root, out, f"train.max_steps={REFERENCE_STEPS}", "resume=auto",
                      *EXACT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_continues(out, reference, step)


# -- checkpoints and output folders ---------------------------------------------------------

def test_resume_on_another_rank_count_is_refused(horovod, resume_root, stopped, tmp_path):
    out, _ = stopped
    ((_, path),) = step_checkpoints(out)
    # The checkpoint's optimizer (exact.EXACT): only the rank layout differs.
    proc = _train(resume_root, tmp_path, "train.gradient_accumulation=2", f"resume={path}",
                  *EXACT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "written by 2 rank(s) x train.local_batch_size=2 x train.gradient_accumulation=1" \
        in proc.stderr
    assert "resume on 2 rank(s)" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_file_on_one_rank_ends_every_rank_with_the_same_line(horovod, tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)  # the train files are symlinks: copied as files
    bad = list_files(root / "train")[1]  # rank 1's partition is files[1::2]
    bad.write_bytes(bad.read_bytes()[:2000])
    proc = _hvd_train(root, tmp_path / "out", "train.max_steps=2")
    text = proc.stdout + proc.stderr
    errors = [line.split("error: ", 1)[1] for line in _rank_lines(text) if "error: " in line]
    assert len(errors) == 2 and errors[0] == errors[1] and str(bad) in errors[0], text[-3000:]
    _assert_first_exit_is(proc.returncode, text, "2")


def test_a_fault_on_one_rank_mid_training_ends_every_rank_with_one_line(horovod, tiny_root,
                                                                        tmp_path):
    """Rank 1's files go bad after the start-up checks passed: it names the file, rank 0 says
    it stopped because another rank failed; exit 2, no traceback."""
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = _hvd_start(root, out, log, "train.max_steps=200", "train.validation_frequency=0")
    try:
        wait_for(lambda: _train_rows(out) >= 1, proc, log)
        for path in list_files(root / "train")[1::2]:  # every file of rank 1's partition
            # Swapped in whole: a reader holding the old file keeps reading it, a new open sees
            # the truncated one; rewritten in place, a reader caught mid-file saw a half-gone
            # file and reported the first dataset it missed instead of the truncation.
            cut = path.with_name(path.name + ".cut")
            cut.write_bytes(path.read_bytes()[:4000])
            os.replace(cut, path)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    errors = {line[:3]: line.split("error: ", 1)[1] for line in _rank_lines(text)
              if "error: " in line}
    assert "truncated" in errors.get("[1]", "") and str(root / "train") in errors["[1]"], text
    timeout = ENV.get("HOROVOD_GLOO_TIMEOUT_SECONDS", "30")
    assert errors.get("[0]") == _silent_peer_line(timeout), text
    _assert_first_exit_is(proc.returncode, text, "2")


def _silent_peer_line(seconds: str) -> str:
    return ("stopped because another rank failed or stopped responding; its error, if any, is "
            f"above (a rank silent for HOROVOD_GLOO_TIMEOUT_SECONDS={seconds} s ends the run: "
            "Horovod's 'Timed out waiting' line above says so; raise it in horovodrun's "
            "environment)")


def test_a_frozen_rank_is_reported_as_a_timeout_with_its_knob(horovod, tiny_root, tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-run: Gloo's collective times out on rank 0 (5 s here), and
    rank 0's line says that a silent rank can end the run and which setting waits longer.
    Rank 1 is let go once rank 0 has said it, and ends on the shut-down as well.

    Once in a fresh-clone CI run the timeout hit a send in the middle of the step's allreduce:
    Horovod's background loop died of it ("uncaught exception") without failing the handle
    rank 0 waited on, so no Python error came, and the watchdog ended the run after
    ``train.stall_timeout`` (300 s then) with its own line naming that setting. That ending is
    accepted too, with the stall timeout cut to 30 s so that it comes quickly."""
    out, log = tmp_path / "out", tmp_path / "run.log"
    env = dict(ENV, HOROVOD_GLOO_TIMEOUT_SECONDS="5")
    proc = subprocess.Popen(_hvd_cmd(tiny_root, out, "train.max_steps=100000",
                                     "train.max_epochs=100000", "train.validation_frequency=0",
                                     "train.stall_timeout=30"),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO, env=env)
    pid = None
    try:
        wait_for(lambda: _train_rows(out) >= 1, proc, log)
        pid = _rank_pid(out, 1)
        os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: any(line.startswith("[0]") and "error: " in line
                             for line in _rank_lines(log.read_text())), proc, log)
        # the launcher or the watchdog may have ended rank 1 already (SIGKILL ends a stopped
        # process too)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        proc.wait(timeout=300)
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    errors = {line[:3]: line.split("error: ", 1)[1] for line in _rank_lines(text)
              if "error: " in line}
    assert "Timed out waiting" in text, text[-3000:]
    line = errors.get("[0]", "")
    if "no progress for" in line:  # the rarer ending (above): rank 0's background loop died
        assert "(train.stall_timeout 30 s)" in line, text[-3000:]
        assert any(row.startswith("[0]") and "background loop uncaught exception" in row
                   for row in text.splitlines()), text[-3000:]
    else:
        assert line == _silent_peer_line("5"), text[-3000:]
    assert "Traceback" not in "\n".join(_rank_lines(text)), text[-3000:]


def test_a_field_of_another_size_is_named_at_start_up_with_every_bad_file(tiny_root, tmp_path):
    """One validation file of another field size and one truncated training file: the start
    names both in one line (exit 2), before any step, instead of failing at the first
    validation."""
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    odd = list_files(root / "validation")[-1]
    odd.unlink()
    write_sample(odd, np.zeros((16, 16, 16), np.float32), np.zeros((16, 16), np.uint8))
    cut = list_files(root / "train")[3]
    cut.write_bytes(cut.read_bytes()[:3000])
    proc = _train(root, tmp_path / "out", "train.max_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if "error: " in ln]
    assert re.search(r"error: 2 of \d+ files fail the start-up check: ", line), line
    assert f"{odd}: 'climate/data' has shape (16, 16, 16), expected (64, 96, 16)" in line
    assert str(cut) in line and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_second_run_on_the_same_output_dir_stops_at_once_naming_the_holder(tiny_root, tmp_path):
    hold = ("import sys, time; from climseg.runlock import RunLock; "
            "RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = _train(tiny_root, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2
    assert f"is in use by another run (host {os.uname().nodename}, pid {holder.pid}" \
        in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "config.yaml").exists()  # the holder's files untouched


@pytest.mark.parametrize("override, message", [
    ("data.crop=[128,128]", "data.crop: crop (128, 128) does not fit the samples' 64x96 field"),
    ("output_dir=/proc/climseg-run", "output_dir: cannot create /proc/climseg-run"),
    ("output_dir={file}/run", "output_dir: cannot create"),
])
def test_bad_crop_or_output_dir_is_one_line_naming_the_key(tiny_root, tmp_path, override,
                                                           message):
    (tmp_path / "file").write_text("not a folder")
    proc = _train(tiny_root, tmp_path / "out", override.format(file=tmp_path / "file"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr


# -- divergence -------------------------------------------------------------------------------

def test_divergence_stops_with_exit_2_and_never_checkpoints_a_broken_model(tiny_root, tmp_path):
    proc = _train(tiny_root, tmp_path, "optimizer.name=adamw", "optimizer.lr=1000000",
                  "train.max_steps=4", "train.log_frequency=4", "train.validation_frequency=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert "training diverged at step" in line and "NaN/inf" in line
    assert "Traceback" not in proc.stderr
    assert not step_checkpoints(tmp_path) and not (tmp_path / "best.pt").exists()


def test_nan_in_an_input_file_is_named(tiny_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_root, root)
    bad = list_files(root / "train")[0]  # unshuffled: in the first batch
    data, labels = read_sample(bad)
    data[:, :, 0] = np.nan
    bad.unlink()
    write_sample(bad, data, labels)
    proc = _train(root, tmp_path / "out", "data.shuffle=false", "train.max_steps=2",
                  "train.log_frequency=2", "train.validation_frequency=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "training diverged at step 1: the loss is NaN/inf from step 1 (rank 0)" in proc.stderr
    assert f"{bad} holds {64 * 96} NaN/inf values" in proc.stderr
    assert "Traceback" not in proc.stderr and not step_checkpoints(tmp_path / "out")

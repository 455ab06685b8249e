"""Writes that fail: a read-only output folder and a full disk are one line naming the folder,
the reason and the free space, exit status 2; nothing half-written is left behind.

Real file systems (tmpfs mounts; root) give the real errors: EROFS and ENOSPC as HDF5, PNG
and the atomic rename meet them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from climseg import predict
from climseg.data.partition import list_files
from test_evaluate_predict import make_checkpoint, tiny_model  # noqa: F401 (a fixture)

PAGE = 4096


@pytest.fixture
def mount_tmpfs(tmp_path):
    """``mount(name, size, read_only=False)``: a tmpfs under tmp_path; unmounted at the end."""
    mounted = []

    def mount(name: str, size: int, read_only: bool = False) -> Path:
        where = tmp_path / name
        where.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert "Traceback" not in lines[0]
    return lines[0]


def test_predict_into_a_read_only_folder_is_one_line(tiny_root, tiny_model, tmp_path,
                                                     mount_tmpfs, capsys):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root)
    out = mount_tmpfs("ro", 1 << 20, read_only=True)
    src = list_files(tiny_root / "test")[0]
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(out), str(src)]) == 2
    assert one_line(capsys) == (f"climseg predict: error: {out}: cannot write {src.stem}.png "
                                "(Read-only file system)")
    assert not list(out.iterdir())


def test_predict_on_a_full_disk_leaves_no_mask_without_its_map(tiny_root, tiny_model, tmp_path,
                                                                mount_tmpfs, capsys):
    ckpt = make_checkpoint(tmp_path / "tiny.pt", tiny_root)
    src = list_files(tiny_root / "test")[0]
    # Sizes of this prediction's map and mask, written where there is room.
    roomy = tmp_path / "roomy"
    args = ["--checkpoint", str(ckpt), "--probabilities", str(src)]
    assert predict.main(["--output", str(roomy), *args]) == 0
    png = (roomy / f"{src.stem}.png").stat().st_size
    mask = (roomy / f"{src.stem}-mask.h5").stat().st_size
    capsys.readouterr()
    assert mask > 2 * PAGE  # the room left below holds the map, not the mask
    # A disk with room for the map and one page more: the map is written, the mask is not.
    pages = -(-png // PAGE) + 1
    out = mount_tmpfs("full", 64 * PAGE)
    filler = out / "filler"
    filler.write_bytes(b"\0" * ((64 - pages) * PAGE))
    assert predict.main(["--output", str(out), *args]) == 2
    line = one_line(capsys)
    assert line.startswith(f"climseg predict: error: {out}: cannot write {src.stem}-mask.h5 "
                           "(No space left on device); ")
    assert line.endswith(" KiB free there")
    assert sorted(p.name for p in out.iterdir()) == ["filler"]  # no map alone, no temporary


def test_make_synthetic_on_a_full_disk_is_one_line(mount_tmpfs):
    out = mount_tmpfs("small", 1 << 20)
    # 64 x 96 x 16 float32 = 384 KiB per sample: the third of four does not fit in 1 MiB.
    done = subprocess.run([sys.executable, "-m", "climseg", "make-synthetic", "--output",
                           str(out / "raw"), "--samples", "4", "--height", "64", "--width", "96",
                           "--workers", "1", "--quiet"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"climseg make-synthetic: error: {out / 'raw'}: cannot write data-")
    assert "(No space left on device); " in line and line.endswith(" KiB free there")
    assert not [p for p in (out / "raw").iterdir() if p.name.startswith(".")]  # no temporary


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow   # two short training runs
def test_training_on_a_full_disk_is_one_line_and_the_checkpoints_stay(tiny_root, mount_tmpfs):
    """The disk fills while the run's reports are written (TensorBoard's writer thread, the
    metrics file, the MLPerf log): one line naming the folder and its free space, exit 2, no
    traceback from any thread; the checkpoint written before is unchanged and, with space
    again, ``resume=auto`` continues from it."""
    # Room for two checkpoints (~42 MB each at ci.yaml's width): the resume at the end writes
    # its own before it removes the one it resumed from.
    out = mount_tmpfs("small", 128 << 20) / "run"

    def train(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "climseg", "train", "--config", "ci",
                               "--data", str(tiny_root), "--output", str(out), "--quiet",
                               *overrides], capture_output=True, text=True, timeout=600)

    first = train("train.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    (checkpoint,) = out.glob("ckpt-step*.pt")
    before = _sha(checkpoint)
    # Leave 64 KiB: enough for the next segment's start (config.yaml, a new MLPerf log, an
    # event file), not for hundreds of steps' reports and validation maps.
    filler = out.parent / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(out).free - (64 << 10))
    full = train("resume=auto", "train.max_steps=2000", "train.max_epochs=1000")
    assert full.returncode == 2, full.stderr[-2000:]
    (line,) = full.stderr.strip().splitlines()
    _clock, line = line.split(" ", 1)  # the run's log lines start with the time of day
    assert line.startswith(f"error: {out}: cannot write its reports (No space left on device); ")
    assert line.endswith(" free there; the checkpoints written so far are intact (free space, "
                         "then resume=auto continues the run)"), line
    assert _sha(checkpoint) == before
    assert [p.name for p in out.glob("ckpt-step*.pt")] == [checkpoint.name]
    filler.unlink()
    again = train("resume=auto", "train.max_steps=4")
    assert again.returncode == 0, again.stderr[-2000:]
    kinds = [json.loads(row)["kind"] for row in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds[-1] == "summary"

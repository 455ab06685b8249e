"""Checkpoints: weights_only round trip, atomic replacement, retention, RNG state."""

import random

import numpy as np
import pytest
import torch

from climseg import checkpoint as ck


def _state(value: float, step: int = 1) -> dict:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
            "rng": [ck.rng_state()], "config": {"model": {"name": "x"}, "seed": 3}}


def test_round_trip_is_weights_only(tmp_path):
    state = _state(0.5)
    path = ck.save_checkpoint(state, tmp_path / "a.pt")
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    assert loaded["step"] == 1 and loaded["config"]["seed"] == 3


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    first = _state(0.5)
    ck.save_checkpoint(first, path)

    def broken_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(_state(9.0), path)
    monkeypatch.undo()
    loaded = ck.load_checkpoint(path)
    assert torch.equal(loaded["model"]["weight"], first["model"]["weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ck.CheckpointError, match="nope.pt: checkpoint file not found"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match="junk.pt: not a readable climseg checkpoint"):
        ck.load_checkpoint(junk)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ck.CheckpointError, match="no 'model' and 'config'"):
        ck.load_checkpoint(other)


def test_saver_keeps_last_k_and_best(tmp_path):
    saver = ck.CheckpointSaver(tmp_path, keep=2)
    for step, best in [(10, True), (20, True), (30, False), (40, False)]:
        saver.save(_state(float(step), step), step, is_best=best)
    assert [s for s, _ in ck.step_checkpoints(tmp_path)] == [30, 40]
    assert ck.latest_checkpoint(tmp_path).name == "ckpt-step00000040.pt"
    assert ck.load_checkpoint(tmp_path / "best.pt")["step"] == 20


def test_saver_off_rank_0_writes_nothing(tmp_path):
    saver = ck.CheckpointSaver(tmp_path / "out", keep=2, enabled=False)
    assert saver.save(_state(1.0, 1), 1, is_best=True) is None
    assert not (tmp_path / "out").exists()


def test_saver_removes_temporaries_of_a_killed_writer(tmp_path):
    stale = [tmp_path / ".ckpt-step00000002.pt.tmp4242-139", tmp_path / ".best.pt.tmp17-3"]
    kept = [tmp_path / "ckpt-step00000001.pt", tmp_path / "notes.tmp1-1"]
    for p in stale + kept:
        p.write_bytes(b"x")
    ck.CheckpointSaver(tmp_path, keep=2)
    assert [p.exists() for p in stale] == [False, False]
    assert [p.exists() for p in kept] == [True, True]


def test_training_state_round_trip_restores_objects(tmp_path):
    def objects(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
        return model, opt, sched

    model, opt, sched = objects(1)
    progress = ck.Progress(step=7, epoch=2, batch_in_epoch=3, best_iou=0.25, validations=4)
    state = ck.training_state(model=model, optimizer=opt, scheduler=sched, scaler=None,
                              progress=progress, rng=[ck.rng_state()], config={"seed": 1})
    ck.save_checkpoint(state, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)
    other, other_opt, other_sched = objects(2)
    restored = ck.restore_training_state(loaded, model=other, optimizer=other_opt,
                                         scheduler=other_sched, scaler=None)
    assert restored == progress
    assert torch.equal(other.weight, model.weight)
    assert other_sched.get_last_lr() == sched.get_last_lr()
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"],
                       opt.state_dict()["state"][0]["exp_avg"])


def test_resolve_resume(tmp_path):
    assert ck.resolve_resume("none", tmp_path) is None
    assert ck.resolve_resume("auto", tmp_path) is None
    for step in (3, 12):
        (tmp_path / ck.checkpoint_name(step)).write_bytes(b"")
    assert ck.resolve_resume("auto", tmp_path).name == "ckpt-step00000012.pt"
    with pytest.raises(ck.CheckpointError, match="missing.pt not found"):
        ck.resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


def test_rng_state_restores_every_generator():
    state = ck.rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(7), random.random()
    ck.set_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]


def test_best_survives_pruning_of_its_step_file(tmp_path):
    saver = ck.CheckpointSaver(tmp_path, keep=1)
    saver.save(_state(1.0, 1), 1, is_best=True)
    saver.save(_state(2.0, 2), 2, is_best=False)
    assert [s for s, _ in ck.step_checkpoints(tmp_path)] == [2]
    assert ck.load_checkpoint(tmp_path / "best.pt")["step"] == 1


def test_foreign_pickle_is_refused_without_weights_only_advice(tmp_path):
    import argparse

    path = tmp_path / "foreign.pt"
    torch.save({"model": argparse.Namespace(lr=1), "config": {}}, path)
    with pytest.raises(ck.CheckpointError, match="holds objects other than tensors") as err:
        ck.load_checkpoint(path)
    assert "weights_only=False" not in str(err.value)


def test_resume_auto_falls_back_past_an_unreadable_newest(tmp_path, caplog):
    saver = ck.CheckpointSaver(tmp_path, keep=3)
    saver.save(_state(0.5, step=2), 2)
    newest = saver.save(_state(0.7, step=4), 4)
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated after it was written
    with caplog.at_level("WARNING"):
        path, state = ck.load_resume("auto", tmp_path)
    assert path == saver.path(2) and state["step"] == 2
    assert str(newest) in caplog.text
    # An explicit path is what the user asked for: no fallback.
    with pytest.raises(ck.CheckpointError, match="ckpt-step00000004.pt: not a readable"):
        ck.load_resume(str(newest), tmp_path)
    assert ck.load_resume("none", tmp_path) is None


def test_world_size_is_recorded_and_read_from_older_checkpoints():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    state = ck.training_state(model=model, optimizer=opt, scheduler=sched, scaler=None,
                              progress=ck.Progress(), rng=[ck.rng_state()] * 2, config={})
    assert ck.world_size_of(state) == 2
    del state["world_size"]  # written before the key existed: one RNG state per rank
    assert ck.world_size_of(state) == 2


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB file system (tmpfs; needs root), so that a write meets a real ENOSPC."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (with the right to mount): {result.stderr}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_is_one_error_and_leaves_previous_checkpoints(small_fs):
    saver = ck.CheckpointSaver(small_fs, keep=2)
    small = {"model": {"w": torch.ones(1000)}, "config": {}, "step": 1}
    saver.save(small, 1, is_best=True)
    big = {"model": {"w": torch.ones(1_000_000)}, "config": {}, "step": 2}  # 4 MB > 2 MiB
    with pytest.raises(ck.CheckpointError) as err:
        saver.save(big, 2, is_best=True)
    message = str(err.value)
    assert "ckpt-step00000002.pt: cannot write the checkpoint" in message
    assert "previous checkpoints are intact" in message and "\n" not in message
    assert sorted(p.name for p in small_fs.iterdir()) == ["best.pt", "ckpt-step00000001.pt"]
    assert torch.equal(ck.load_checkpoint(saver.path(1))["model"]["w"], torch.ones(1000))
    assert ck.load_checkpoint(small_fs / "best.pt")["step"] == 1

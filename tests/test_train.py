"""The trainer end to end on tiny synthetic data: single process in-process, and two ranks
under ``horovodrun -np 2 --gloo``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from climseg import train as train_module
from climseg.checkpoint import load_checkpoint, step_checkpoints
from climseg.config import load_config
from climseg.health import FP16_SKIP_LIMIT, Health
from conftest import require_horovod
from exact import EXACT, assert_same_losses, assert_same_weights, losses

# Ranks or training in (nearly) every test: out of make test-fast, and the launcher guard's
# multiprocess mark (tests/conftest.py).
pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parent.parent
CI = REPO / "yaml" / "ci.yaml"
HOROVODRUN = Path(sys.executable).parent / "horovodrun"


def _train_cli(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m climseg.train --config yaml/ci.yaml OVERRIDES`` in one process."""
    return subprocess.run([sys.executable, "-m", "climseg.train", "--config", str(CI), *overrides],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    cfg = load_config(CI, [f"data.root={tiny_root}", f"output_dir={out}"])
    summary = train_module.train(cfg)
    return out, summary


def test_single_process_outputs(single_run):
    out, summary = single_run
    assert summary["steps"] == 6
    final_eval = [r for r in _metrics(out) if r["kind"] == "eval"][-1]
    assert summary["eval_mean_iou"] == final_eval["mean_iou"]
    assert summary["eval_mean_iou"] == pytest.approx(sum(final_eval["per_class_iou"]) / 3)
    assert (out / "config.yaml").is_file()
    rows = _metrics(out)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3, 6]
    (ckpt,) = [p for _, p in step_checkpoints(out)]
    state = torch.load(ckpt, weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "epoch", "batch_in_epoch",
                "rng", "config", "best_iou"):
        assert key in state, key
    assert state["step"] == 6
    assert state["config"]["output_dir"] == str(out)
    assert (out / "best.pt").is_file()


def test_tensorboard_has_scalars_and_image(single_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = single_run
    # The run is listed under its output folder's name, not as ".".
    acc = EventAccumulator(str(out / "tensorboard" / out.name),
                           size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ("train/loss", "train/iou", "train/lr", "train/samples_per_second",
                "train/grad_norm", "train/epoch", "perf/data_wait_share", "eval/loss",
                "eval/mean_iou", "eval/iou_tropical_cyclone", "eval/iou_atmospheric_river",
                "eval/seconds"):
        assert tag in tags["scalars"], tag
    assert "validation/map" in tags["images"]
    image = acc.Images("validation/map")[0]
    assert image.width > 100 and image.height > 100
    # The values are the run's own: each step's logged loss is metrics.jsonl's (TensorBoard
    # stores float32).
    logged = {event.step: event.value for event in acc.Scalars("train/loss")}
    expected = {r["step"]: r["loss"] for r in _metrics(out) if r["kind"] == "train"}
    assert sorted(logged) == sorted(expected) == [1, 2, 3, 4, 5, 6]
    for step, loss in expected.items():
        assert logged[step] == pytest.approx(loss, rel=1e-6), step
    evals = {r["step"]: r["mean_iou"] for r in _metrics(out) if r["kind"] == "eval"}
    assert {e.step: e.value for e in acc.Scalars("eval/mean_iou")} == \
        pytest.approx(evals, rel=1e-6)


def test_mlperf_log_parses(single_run):
    from mlperf_logging.compliance_checker.mlp_parser import parse_file

    out, _ = single_run
    loglines, errors = parse_file(str(out / "mlperf.log"), ruleset="3.0.0")
    assert not errors
    keys = [line.key for line in loglines]
    for key in ("init_start", "init_stop", "run_start", "run_stop", "epoch_start", "epoch_stop",
                "eval_start", "eval_stop", "eval_accuracy", "train_samples", "eval_samples",
                "global_batch_size", "seed", "gradient_accumulation_frequency",
                "batchnorm_group_size", "opt_name", "opt_lr", "opt_betas", "opt_eps",
                "opt_weight_decay", "scheduler_type", "scheduler_lr_warmup_steps",
                "scheduler_lr_warmup_factor", "opt_bias_correction", "opt_max_grad_norm"):
        assert key in keys, key
    by_key = {line.key: line for line in loglines}
    assert by_key["train_samples"].value["value"] == 16
    assert "epoch_num" in by_key["eval_accuracy"].value["metadata"]


def test_checkpoint_records_its_own_evaluation_as_best(single_run):
    out, _ = single_run
    rows = _metrics(out)
    final_eval = [r for r in rows if r["kind"] == "eval"][-1]
    best_so_far = max(r["mean_iou"] for r in rows if r["kind"] == "eval")
    state = load_checkpoint(out / "best.pt")
    assert state["best_iou"] == best_so_far
    assert load_checkpoint(step_checkpoints(out)[-1][1])["best_iou"] >= final_eval["mean_iou"]


def test_every_better_validation_is_saved_at_once_as_best(tiny_root, tmp_path):
    """train.save_best: a checkpoint at each validation that beats all before it, best.pt at
    the best one, not only at save points (here there are none but the end)."""
    cfg = load_config(CI, [f"data.root={tiny_root}", f"output_dir={tmp_path}",
                           "train.save_best=true", "train.validation_frequency=1",
                           "train.keep_checkpoints=10"])
    train_module.train(cfg)
    evals = [(r["step"], r["mean_iou"]) for r in _metrics(tmp_path) if r["kind"] == "eval"]
    better, best = [], float("-inf")
    for step, iou in evals:
        if iou > best:
            better.append(step)
            best = iou
    saved = [step for step, _ in step_checkpoints(tmp_path)]
    assert saved == sorted(set(better) | {6}), (evals, saved)
    assert load_checkpoint(tmp_path / "best.pt")["step"] == better[-1]
    assert len(better) >= 2  # the oracle must have something to tell apart from "at the end"


def test_a_save_point_before_its_own_better_validation_is_saved_again_as_best(tiny_root,
                                                                               tmp_path):
    """Step 8 is a save point and an epoch end (8 steps per epoch): saved, then validated
    better than ever, so saved again, now recording that score, and best.pt names it."""
    cfg = load_config(CI, [f"data.root={tiny_root}", f"output_dir={tmp_path}",
                           "train.save_best=true", "train.save_frequency=8",
                           "train.validation_frequency=0", "train.max_steps=9",
                           "train.keep_checkpoints=10"])
    train_module.train(cfg)
    first = [r for r in _metrics(tmp_path) if r["kind"] == "eval"][0]
    assert first["step"] == 8
    assert load_checkpoint(tmp_path / "ckpt-step00000008.pt")["best_iou"] == first["mean_iou"]
    evals = {r["step"]: r["mean_iou"] for r in _metrics(tmp_path) if r["kind"] == "eval"}
    best_step = max(evals, key=lambda s: (evals[s], -s))
    assert load_checkpoint(tmp_path / "best.pt")["step"] == best_step


def test_checkpoints_by_the_clock_follow_the_vote_one_step_late(tiny_root, tmp_path):
    """train.save_interval_minutes: rank 0's clock says "due" at every step boundary (the
    interval is 6 ms, a step longer); the vote brings it one step later, and a vote cast
    before a save is not obeyed after it: so steps 2, 4, then the final 6."""
    cfg = load_config(CI, [f"data.root={tiny_root}", f"output_dir={tmp_path}",
                           "train.save_interval_minutes=0.0001", "train.keep_checkpoints=10",
                           "train.validation_frequency=0"])
    train_module.train(cfg)
    assert [step for step, _ in step_checkpoints(tmp_path)] == [2, 4, 6]


def test_epoch_budget_is_reported_as_such(tiny_root, tmp_path):
    # 16 training files, local batch 2, one rank: 8 steps per epoch, stopped by the epochs.
    cfg = load_config(CI, [f"data.root={tiny_root}", f"output_dir={tmp_path}",
                           "train.max_steps=null", "train.max_epochs=1",
                           "train.validation_frequency=0", "train.log_frequency=4"])
    # (not data.crop=[16, 16]: a 1x1 feature map there makes LAMB's loss NaN at step 5, which
    # the trainer now stops on instead of saving NaN weights)
    summary = train_module.Trainer(cfg).fit()
    assert (summary["steps"], summary["stop_reason"], summary["epochs_started"]) == (8, "max_epochs", 1)


def test_bad_config_exits_2_with_one_line(tiny_root, tmp_path):
    proc = _train_cli(f"data.root={tiny_root}", f"output_dir={tmp_path}", "optimizer.lr=-1")
    assert proc.returncode == 2
    assert "optimizer.lr: must be positive" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_data_exits_2_and_leaves_no_output_folder(tmp_path):
    proc = _train_cli(f"data.root={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2
    assert f"error: data.root: {tmp_path / 'nothing'} is not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # the failed start created it, and removed it


def test_a_failed_start_leaves_the_previous_runs_files_as_they_were(tiny_root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("the previous run's\n")
    (out / "mlperf.log").write_text("the previous run's\n")
    proc = _train_cli(f"data.root={tiny_root}", f"output_dir={out}", "data.crop=[4096,4096]")
    assert proc.returncode == 2 and "data.crop" in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [".climseg.lock", "config.yaml",
                                                      "mlperf.log"]
    assert (out / "config.yaml").read_text() == (out / "mlperf.log").read_text() \
        == "the previous run's\n"


# -- two ranks under horovodrun ------------------------------------------------------------

def _hvd_train(report: Path, *overrides: str) -> dict:
    require_horovod()
    cmd = [str(HOROVODRUN), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable,
           str(REPO / "tests" / "scripts" / "hvd_train.py"), str(report), "--config", str(CI),
           *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(report.read_text())


@pytest.fixture(scope="module")
def two_rank_run(tiny_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("hvd")
    report = _hvd_train(out / "report.json", f"data.root={tiny_root}", f"output_dir={out}",
                        "train.max_steps=16", "train.validation_frequency=8",
                        "train.log_frequency=2")
    return out, report


def test_two_ranks_keep_identical_parameters(two_rank_run):
    _, report = two_rank_run
    assert report["size"] == 2
    rank0, rank1 = report["checksums"]
    assert rank0 == rank1
    # ... because both trained, not because neither did: every parameter moved.
    unchanged = [i for i, (before, after, is_parameter)
                 in enumerate(zip(report["initial"], rank0, report["parameters"]))
                 if is_parameter and before == after]
    assert not unchanged and any(report["parameters"]), unchanged


def test_two_rank_mlperf_log_fails_the_checker_only_on_the_quality_target(two_rank_run):
    # The official checker is the oracle. A seconds-long run cannot reach the 0.82 IoU that
    # even the open rules require, so that must be its one failure: every required key, the
    # decided division and the schedule the closed rules do not know must pass.
    out, _ = two_rank_run
    proc = subprocess.run(
        [sys.executable, "-m", "mlperf_logging.compliance_checker", "--usage", "hpc",
         "--ruleset", "3.0.0", "--log_output", str(out / "checker.log"), str(out / "mlperf.log")],
        capture_output=True, text=True, timeout=120)
    failures = [line for line in proc.stderr.splitlines()
                if "Required" in line or "Failed" in line]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert failures and all("eval_accuracy" in line for line in failures), proc.stderr[-2000:]
    assert '"submission_division", "value": "open"' in (out / "mlperf.log").read_text()


def test_two_ranks_loss_falls(two_rank_run):
    out, _ = two_rank_run
    losses = [r["loss"] for r in _metrics(out) if r["kind"] == "train"]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_resume_matches_uninterrupted_run(tiny_root, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    # A warmup + cosine schedule, so that the learning rates themselves must line up too.
    # SGD (exact.EXACT): the two runs agree to rounding, and so to exact.REL.
    common = [f"data.root={tiny_root}", "train.log_frequency=1", "train.validation_frequency=3",
              "scheduler.type=cosine", "scheduler.t_max=8", "scheduler.warmup_steps=2", *EXACT]
    _hvd_train(tmp_path / "a.json", *common, f"output_dir={whole}", "train.max_steps=6")
    _hvd_train(tmp_path / "b.json", *common, f"output_dir={part}", "train.max_steps=3")
    assert load_checkpoint(step_checkpoints(part)[-1][1])["step"] == 3
    _hvd_train(tmp_path / "c.json", *common, f"output_dir={part}", "train.max_steps=6",
               "resume=auto")
    expected = {r["step"]: r for r in _metrics(whole) if r["kind"] == "train"}
    resumed = {r["step"]: r for r in _metrics(part) if r["kind"] == "train"}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert len({expected[step]["lr"] for step in (4, 5, 6)}) == 3
    for step in (4, 5, 6):
        assert resumed[step]["lr"] == expected[step]["lr"]
    assert_same_losses(losses(part), losses(whole), (4, 5, 6))
    assert_same_weights(part, whole)


def test_mlperf_log_can_be_opened_twice_in_one_process(tmp_path):
    from climseg.mlperf import MLPerfLog

    for name in ("a.log", "b.log"):
        log = MLPerfLog(tmp_path / name)
        log.event("seed", 7)
        log.close()
    for name in ("a.log", "b.log"):
        lines = (tmp_path / name).read_text().splitlines()
        assert len(lines) == 1 and '"key": "seed"' in lines[0]


LAUNCHER_MISMATCH = (
    "climseg train: error: the launcher started 2 ranks but Horovod sees 1: under srun or "
    "mpirun Horovod needs its MPI controller (horovodrun --check-build must list MPI; "
    "rebuild with tools/install_horovod.sh CLIMSEG_HOROVOD_MPI=1); under torchrun or a plain "
    "srun use dist.engine=torch")


def test_launcher_ranks_without_matching_horovod_exit_2(tiny_root, tmp_path):
    # srun started 2 tasks, but this process's Horovod runs alone (no MPI rendezvous): each
    # task would silently train as rank 0 of 1. The trainer must refuse instead.
    env = dict(os.environ, SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_LOCALID="0")
    proc = _train_cli(f"data.root={tiny_root}", f"output_dir={tmp_path}", env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == LAUNCHER_MISMATCH, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "config.yaml").exists()


def test_two_ranks_fp16_horovod_recipe(tiny_root, tmp_path):
    # fp16 runs the Horovod GradScaler recipe (synchronize, unscale, clip, step inside
    # skip_synchronize); AdamW clips the global norm outside the optimizer.
    # channels_last too: Horovod refuses non-contiguous tensors, so the weights must stay
    # contiguous while the input is channels_last.
    steps = 6
    report = _hvd_train(tmp_path / "r.json", f"data.root={tiny_root}", f"output_dir={tmp_path}",
                        f"train.max_steps={steps}", "train.precision=fp16",
                        "optimizer.name=adamw", "train.validation_frequency=0",
                        "train.channels_last=true")
    assert report["summary"]["steps"] == steps
    rank0, rank1 = report["checksums"]
    assert rank0 == rank1
    assert all(before != after for before, after, is_parameter
               in zip(report["initial"], rank0, report["parameters"]) if is_parameter)
    # GradScaler starts at 2**16 and grows only every 2000 steps; a step with non-finite
    # gradients is skipped, halves the scale and restarts the count of good steps. It finds
    # its level in the first steps (measured: steps 1 and 2 are skipped here, so a two-step
    # run trained nothing), then applies every step: `skipped` halvings, then `good` steps in
    # a row, the state the checkpoint gives a resumed run.
    scaler = load_checkpoint(step_checkpoints(tmp_path)[-1][1])["scaler"]
    good = scaler["_growth_tracker"]
    assert 1 <= good < steps and scaler["scale"] == 2.0 ** (16 - (steps - good)), scaler


def test_two_ranks_batchnorm_group_of_two_on_cpu(tiny_root, tmp_path):
    # Batch-norm statistics shared by both ranks, on CPU and Gloo (Horovod's own
    # SyncBatchNorm would need GPUs): two ranks of one sample each train as one process with
    # batches of two. Unshuffled whole fields make the data the same: rank r reads
    # files[r::2] in order, so step k is files 2k and 2k + 1 either way, and no random crop
    # depends on the position. SGD (exact.EXACT); the group's sums are added in another order
    # than one BatchNorm2d's: exact on step 1 (the forward), close after (the backward through
    # the group's sums). Measured on the synthetic data since the vapour spectrum's synoptic
    # roll-off: steps 2 and 3 5.4e-5 and 6.9e-4 apart; a rank whose loss adds nothing to the
    # gradient (tests/scripts/mutants.py) moved them by 3.0e-3 and 7.4e-3. Step 2 is held to
    # 5e-4 (9x its noise, 6x below the mutant), step 3, where the noise has grown, to 3e-3.
    # (On the data before: noise 1.9e-5 and 3.2e-5, mutant 3.5e-3 and 9.4e-3.)
    common = [f"data.root={tiny_root}", "train.max_steps=3", "train.validation_frequency=0",
              "train.log_frequency=1", "data.shuffle=false", "data.crop=null", *EXACT]
    ranks, one = tmp_path / "ranks", tmp_path / "one"
    report = _hvd_train(tmp_path / "r.json", *common, f"output_dir={ranks}",
                        "train.local_batch_size=1", "train.batchnorm_group_size=2")
    rank0, rank1 = report["checksums"]
    assert rank0 == rank1
    log = (ranks / "mlperf.log").read_text()
    assert '"key": "batchnorm_group_size", "value": 2' in log
    proc = _train_cli(*common, f"output_dir={one}", "train.local_batch_size=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_losses(losses(ranks), losses(one), [1])
    assert_same_losses(losses(ranks), losses(one), [2], rel=5e-4)
    assert_same_losses(losses(ranks), losses(one), [3], rel=3e-3)


def test_batchnorm_group_that_does_not_divide_the_ranks_exits_2(tiny_root, tmp_path):
    proc = _train_cli(f"data.root={tiny_root}", f"output_dir={tmp_path}",
                      "train.batchnorm_group_size=2")
    assert proc.returncode == 2
    assert "train.batchnorm_group_size: 2 does not divide the 1 ranks" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fp16_divergence_only_after_a_streak_of_skipped_steps():
    # GradScaler skips a non-finite step by design; only FP16_SKIP_LIMIT in a row is divergence.
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    health = Health(torch.device("cpu"), fp16=True)
    step = 0
    for _ in range(FP16_SKIP_LIMIT - 1):
        step += 1
        health.update(step, nan, None)
    step += 1
    health.update(step, one, None)  # a good step ends the streak
    assert health.first.tolist() == [1, 0, 0]
    for _ in range(FP16_SKIP_LIMIT):
        step += 1
        health.update(step, one, torch.tensor(float("inf")))
    assert health.first.tolist() == [1, step - FP16_SKIP_LIMIT + 1, step]
    # fp32: the first non-finite step is fatal.
    health = Health(torch.device("cpu"), fp16=False)
    health.update(1, one, None)
    health.update(2, nan, None)
    assert health.first.tolist() == [2, 0, 2]


def test_stop_vote_is_read_one_step_late():
    from climseg.dist import AnyRankPoll

    poll = AnyRankPoll("test_vote")
    assert poll.exchange([0, 0]) is None
    assert poll.exchange([1, 0]) == [0, 0]
    assert poll.exchange([0, 0]) == [1, 0]
    poll.drain()
    assert poll.exchange([0, 0]) is None


def test_a_stop_counts_the_ranks_signalled_by_the_boundary_it_is_decided_at():
    """srun and horovodrun signal the ranks one by one: a vote cast when one of two had its
    signal decides the stop, and the stop names both when both had it a step later."""
    from climseg.control import StopSignals, StopVote

    class TwoRankPoll:  # the sums two ranks would give: one signalled at the cast, two a step on
        def __init__(self):
            self.sums = [[0, 0, 0], [1, 0, 0], [2, 0, 0]]
            self.taken = 0

        def exchange(self, flags):
            return self.take()

        def take(self):
            self.taken += 1
            return self.sums[self.taken - 1]

    vote = StopVote(StopSignals())
    vote._poll = TwoRankPoll()
    assert vote.poll(2) is None
    assert vote.poll(2) == "stopped by SIGTERM (2 of 2 ranks)"
    assert vote._poll.taken == 3  # the vote in flight was waited for, not left behind


def test_a_failed_start_releases_the_output_dir_lock(tmp_path):
    from climseg.data.format import DataError
    from climseg.runlock import RunLock

    cfg = load_config(CI, [f"data.root={tmp_path / 'nothing'}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(DataError, match="nothing"):
        train_module.Trainer(cfg)
    RunLock(tmp_path / "out").acquire().release()  # not held by the dead Trainer

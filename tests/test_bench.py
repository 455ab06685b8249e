"""Smoke tests of ``python -m climseg.bench``: each mode runs tiny and writes its JSON.

No timing assertions: only that the numbers are there and positive.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from climseg import bench

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path, argv):
    out = tmp_path / "bench.json"
    assert bench.main(argv + ["--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["results"] and record["environment"]["torch"]
    for row in record["results"]:
        for key in ("samples_per_s", "ms_per_step"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["batch_size"] >= 1 and row["steps"] >= 1
    return record


def test_loader_mode(tiny_root, tmp_path, capsys):
    record = run(tmp_path, ["loader", "--data", str(tiny_root), "--batch-size", "2",
                            "--crop", "32", "48", "--steps", "2", "--warmup", "1",
                            "--workers", "1", "2", "--ref-workers", "0", "1",
                            "--repeats", "1", "--device", "cpu"])
    kinds = [row["extra"]["kind"] for row in record["results"]]
    assert kinds == ["climseg", "climseg", "reference", "reference"]
    for row in record["results"]:
        assert row["mb_per_s"] > 0 and row["peak_memory_gib"] > 0
    # The summary's ratio is of the fastest rows of each kind, within each repeat too.
    summary, rows = record["summary"], record["results"]
    ours = max((r for r in rows if r["extra"]["kind"] == "climseg"),
               key=lambda r: r["samples_per_s"])
    ref = max((r for r in rows if r["extra"]["kind"] == "reference"),
              key=lambda r: r["samples_per_s"])
    assert (summary["climseg_best"], summary["reference_best"]) == (ours["name"], ref["name"])
    assert summary["speedup"] == pytest.approx(ours["samples_per_s"] / ref["samples_per_s"])
    # one repeat: each row's median is its one run, so the repeat's ratio is the same
    assert summary["speedup_per_repeat"] == [pytest.approx(summary["speedup"])]
    assert summary["normalization"].startswith("minmax")
    assert summary["crop"] == [32, 48]
    assert "reference best" in capsys.readouterr().out


def test_loader_mode_cold_with_channels(tiny_root, tmp_path):
    # The older spellings: --data naming the split folder, --threads, --json (in run()'s place)
    out = tmp_path / "old.json"
    assert bench.main(["loader", "--data", str(tiny_root / "train"), "--threads", "2",
                       "--steps", "1", "--warmup", "0", "--no-reference", "--repeats", "1",
                       "--device", "cpu", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["summary"]["files"] == 16
    record = run(tmp_path, ["loader", "--data", str(tiny_root), "--batch-size", "4",
                            "--channels", "0", "5", "--cold", "--workers", "2",
                            "--no-reference", "--repeats", "1", "--device", "cpu"])
    assert record["summary"]["cold_cache"] is True
    assert record["results"][0]["steps"] == 16 // 4   # one pass over the files


@pytest.mark.slow   # model steps: tens of CPU seconds
def test_step_mode(tmp_path):
    record = run(tmp_path, ["step", "--size", "32", "48", "--batch-size", "1", "--steps", "1",
                            "--warmup", "1", "--device", "cpu"])
    row = record["results"][0]
    assert row["tflops"] > 0 and row["data_wait_share"] == 0.0
    assert record["summary"]["precision"] == "fp32"
    assert row["extra"]["first_step_s"] > 0


@pytest.mark.slow   # a trainer built and stepped
def test_train_mode(tiny_root, tmp_path):
    record = run(tmp_path, ["train", "--config", str(REPO / "yaml" / "ci.yaml"), "--steps",
                            "1", "--warmup", "0", "--output-dir", str(tmp_path / "run"),
                            f"data.root={tiny_root}", "train.local_batch_size=2",
                            "train.max_epochs=100"])
    row = record["results"][0]
    assert 0 <= row["data_wait_share"] <= 1 and row["tflops"] > 0
    assert row["steps"] == 1 and row["extra"]["trainer_summary"]["steps"] == 1


@pytest.mark.slow   # a trainer built and stepped
def test_train_mode_counts_the_flops_of_the_field_it_trains_on(tiny_root, tmp_path, caplog):
    """Uncropped tiny samples (64x96): the FLOPs of that field, not of the real 768x1152. In
    a temporary run folder (no --run-dir): exactly --warmup + --steps trainer steps, and no
    log line names a path in the folder deleted at the end."""
    from climseg.engine import tflop_per_sample

    caplog.set_level("INFO")
    record = run(tmp_path, ["train", "--config", str(REPO / "yaml" / "ci.yaml"), "--steps",
                            "2", "--warmup", "1", "--data", str(tiny_root), "--workers", "1",
                            "data.crop=null", "train.max_epochs=100"])
    row = record["results"][0]
    assert record["summary"]["crop"] == [64, 96]
    # ci.yaml's model.width 0.25: a sixteenth of the reference's FLOPs
    assert row["tflops"] == pytest.approx(row["samples_per_s"] * tflop_per_sample(64, 96) / 16)
    assert row["steps"] == 2 and row["extra"]["trainer_summary"]["steps"] == 3
    lines = "\n".join(r.getMessage() for r in caplog.records)
    assert "checkpoint: <temporary run folder>/ckpt-step" in lines
    assert "climseg-bench-" not in lines


def test_bad_data_folder_exits_2(tmp_path):
    assert bench.main(["loader", "--data", str(tmp_path / "missing")]) == 2


def test_loader_times_the_layout_the_trainer_gives_the_model(tiny_root, tmp_path, monkeypatch):
    # Every timed batch goes through Precision.prepare, as in the trainer: with channels_last
    # off on the CPU that is the NCHW copy the trainer makes, which the loader must pay for.
    from climseg.engine import Precision

    seen = []
    original = Precision.prepare

    def spy(self, x):
        out = original(self, x)
        seen.append((self.channels_last, out.is_contiguous(),
                     out.is_contiguous(memory_format=torch.channels_last)))
        return out

    monkeypatch.setattr(Precision, "prepare", spy)
    common = ["loader", "--data", str(tiny_root), "--batch-size", "2", "--steps", "2",
              "--warmup", "1", "--workers", "1", "--no-reference", "--repeats", "1",
              "--device", "cpu"]
    record = run(tmp_path, common)
    assert record["summary"]["model_input"] == "NCHW"
    assert seen == [(False, True, False)] * 3
    seen.clear()
    record = run(tmp_path, common + ["--channels-last", "on"])
    assert record["summary"]["model_input"] == "channels_last"
    assert seen == [(True, False, True)] * 3


@pytest.mark.slow   # model steps in bf16 with LAMB
def test_step_mode_layout_options(tmp_path):
    record = run(tmp_path, ["step", "--size", "32", "48", "--batch-size", "1", "--steps", "1",
                            "--warmup", "1", "--device", "cpu", "--channels-last", "on",
                            "--channels-last-weights", "--precision", "bf16",
                            "--optimizer", "lamb"])
    summary = record["summary"]
    assert summary["channels_last"] is True and summary["channels_last_weights"] is True
    assert summary["precision"] == "bf16" and summary["optimizer"] == "lamb"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_is_one_line_and_exit_2(capsys):
    assert bench.main(["step", "--device", "cuda", "--size", "32", "48"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "climseg bench step: error: --device: cuda requested but no GPU is visible"]


@pytest.mark.parametrize("argv, line", [
    (["loader", "--data", "d", "--steps", "0"],
     "climseg bench loader: error: argument --steps: must be at least 1, got 0 "
     "(see climseg bench loader --help)"),
    (["loader", "--data", "d", "--workers", "0"],
     "climseg bench loader: error: argument --workers: must be at least 1, got 0 "
     "(see climseg bench loader --help)"),
    (["loader", "--dta", "d"],
     "climseg bench loader: error: unrecognized arguments: --dta d; did you mean --data? "
     "(see climseg bench loader --help)"),
    (["loader"], "climseg bench loader: error: the following arguments are required: --data "
                 "(see climseg bench loader --help)"),
    (["trian"], "climseg bench: error: argument MODE: invalid choice: 'trian' (choose from "
                "'step', 'loader', 'allreduce', 'train'); did you mean train? "
                "(see climseg bench --help)"),
    (["step", "--warmup", "0"], "climseg bench step: error: argument --warmup: must be at "
                                "least 1 (the first step is timed on its own) "
                                "(see climseg bench step --help)"),
])
def test_bad_arguments_are_one_line_naming_the_flag(capsys, argv, line):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


def test_missing_data_folder_is_one_line(tmp_path, capsys):
    assert bench.main(["loader", "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"climseg bench loader: error: {tmp_path / 'missing' / 'train'}"), err


def _parameter_count() -> tuple[int, int]:
    from climseg.model import build_model

    params = list(build_model(in_channels=16, num_classes=3).parameters())
    return len(params), sum(p.numel() for p in params)


def _bench_allreduce(tmp_path, launcher: list[str], *args: str) -> tuple[dict, str]:
    """``climseg.bench allreduce ARGS`` under ``launcher`` (a subprocess: the engine it starts
    must not stay in the test process); its summary and stdout."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    proc = subprocess.run([*launcher, sys.executable, "-m", "climseg.bench", "allreduce",
                           "--steps", "1", "--device", "cpu", *args, "--json", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())["summary"], proc.stdout


@pytest.mark.slow  # builds the model, starts Horovod
def test_allreduce_mode_on_one_process_sums_the_real_gradient_set(horovod, tmp_path):
    s, _ = _bench_allreduce(tmp_path, [], "--warmup", "0", "--fp16")
    tensors, values = _parameter_count()
    assert (s["ranks"], s["tensors"], s["bytes"]) == (1, tensors, 2 * values)
    assert s["busbw_gb_s"] is None  # no link crossed
    assert s["algbw_gb_s"] == pytest.approx(s["bytes"] / s["seconds"] / 1e9)


@pytest.mark.multiprocess
def test_allreduce_mode_across_two_horovod_ranks(horovod, tmp_path):
    import sys

    s, stdout = _bench_allreduce(tmp_path, [str(Path(sys.executable).parent / "horovodrun"),
                                            "-np", "2", "-H", "localhost:2", "--gloo"],
                                 "--warmup", "1", "--fusion-mb", "0")
    tensors, values = _parameter_count()
    assert (s["ranks"], s["tensors"], s["bytes"]) == (2, tensors, 4 * values)
    # Two ranks: a ring moves 2(n-1)/n = 1 times the bytes over each link.
    assert s["busbw_gb_s"] == pytest.approx(s["algbw_gb_s"])
    assert "busbw" in stdout and "on 2 rank(s)" in stdout

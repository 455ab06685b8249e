"""RunMonitor: what a run reports on each rank, without a training run."""

import logging

from climseg.config import load_config
from climseg.monitor import RunMonitor, duration


def test_validation_progress_lines_and_passthrough(caplog, tmp_path):
    cfg = load_config(None, ["data.root=/nowhere", f"output_dir={tmp_path / 'out'}"])
    monitor = RunMonitor(cfg, primary=False)  # off rank 0: nothing is written
    with caplog.at_level(logging.INFO, logger="climseg.train"):
        out = list(monitor.eval_progress(iter(range(5)), total=5, every_seconds=0.0))
        quiet = list(monitor.eval_progress(iter(range(5)), total=5, every_seconds=3600.0))
    assert out == quiet == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validation:")]
    # every batch but the last (the result line follows it), and none for a short validation
    assert [line.split(",")[0] for line in lines] == [f"validation: {i}/5 batches" for i in range(1, 5)]
    assert not (tmp_path / "out").exists()


def test_duration():
    assert duration(3725.9) == "1:02:05"
    assert duration(float("inf")) == "?"

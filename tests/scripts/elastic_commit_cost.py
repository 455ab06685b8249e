"""What an elastic commit and a roll-back cost: the trainer's own save and restore.

Usage: python tests/scripts/elastic_commit_cost.py DATA_ROOT [REPEATS] [optimizer.name=adamw ...]
Builds the trainer of yaml/ci.yaml (the full DeepLabv3+, whatever the crop) with
train.elastic=true on DATA_ROOT, takes one training step so that the optimizer holds its
state, then times ElasticDriver.save (a commit, without the host-update broadcast) and
ElasticDriver.restore, and prints the median and range in seconds.
"""

import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from climseg import dist
from climseg.config import load_config
from climseg.logs import setup_logging
from climseg.elastic import ElasticDriver
from climseg.train import Trainer

REPO = Path(__file__).resolve().parents[2]


def timed(fn, repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> None:
    root = sys.argv[1]
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    dist.init()
    setup_logging(quiet=True)
    logging.getLogger("climseg.train").setLevel(logging.ERROR)  # restore's warning
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(REPO / "yaml" / "ci.yaml", [
            f"data.root={root}", f"output_dir={out}", "train.elastic=true",
            "train.global_batch_size=2", "train.max_steps=1", "train.validation_frequency=0",
            *sys.argv[3:]])
        trainer = Trainer(cfg, start=False)
        driver = ElasticDriver(trainer)
        driver.enter()
        batches = trainer.data.train.epoch(0)
        trainer.train_step([next(batches) for _ in range(trainer.accum)])
        batches.close()
        params = sum(p.numel() for p in trainer.model.parameters())
        state = sum(v.numel() for s in trainer.optimizer.state.values() for v in s.values()
                    if hasattr(v, "numel"))
        saves = timed(driver.save, repeats)
        restores = timed(driver.restore, repeats)
        trainer.close()
    print(f"{cfg.optimizer.name}: {params / 1e6:.2f} M parameters, {state / 1e6:.2f} M optimizer "
          f"values, {repeats} repeats")
    for name, seconds in (("commit (save)", saves), ("roll-back (restore)", restores)):
        print(f"{name:20s} median {statistics.median(seconds):.3f} s  "
              f"range {min(seconds):.3f}-{max(seconds):.3f} s")


if __name__ == "__main__":
    main()

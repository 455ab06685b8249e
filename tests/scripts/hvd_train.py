"""Run climseg.train under horovodrun and report what the tests check across ranks.

Usage: horovodrun -np 2 --gloo python tests/scripts/hvd_train.py REPORT.json --config C [k=v ...]
Rank 0 writes REPORT.json with the summary and, for each rank, a float64 checksum of its
final parameters and batch-norm buffers (all must agree after training); ``initial`` holds
rank 0's checksums before training (each parameter's must have changed), ``parameters`` tells
which entries are trainable parameters (the others are buffers).
"""

import json
import sys

import torch

from climseg import dist
from climseg.config import load_config
from climseg.logs import setup_logging
from climseg.train import Trainer
from climseg.train_cli import parse_args


def main() -> None:
    report_path, argv = sys.argv[1], sys.argv[2:]
    args = parse_args(argv)
    dist.init()
    setup_logging(dist.rank(), dist.size())
    trainer = Trainer(load_config(args.config, args.overrides))
    initial = _checksums(trainer.model)
    summary = trainer.fit()
    checksums = dist.allgather_object(_checksums(trainer.model), name="checksums")
    parameters = {name for name, _ in trainer.model.named_parameters()}
    names = [name for name, t in trainer.model.state_dict().items() if t.is_floating_point()]
    if dist.is_primary():
        with open(report_path, "w") as f:
            json.dump({"summary": summary, "size": dist.size(), "checksums": checksums,
                       "initial": initial, "parameters": [n in parameters for n in names]}, f)


def _checksums(model: torch.nn.Module) -> list[float]:
    return [float(t.double().sum()) + float((t.double() ** 2).sum())
            for t in model.state_dict().values() if t.is_floating_point()]


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

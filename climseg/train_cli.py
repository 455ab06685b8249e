"""``climseg train`` (``python -m climseg.train``): the command line around
:func:`climseg.train.train`, and its exit statuses (docs/reliability.md)."""

from __future__ import annotations

import logging

from climseg import cli, dist
from climseg.config import ConfigError, load_config
from climseg.control import SIGNALS
from climseg.errors import RUN_ERRORS, DivergenceError, RunError
from climseg.logs import setup_logging
from climseg.train import EXIT_ERROR, EXIT_OK, EXIT_STOPPED, train

log = logging.getLogger("climseg.train")


def parse_args(argv: list[str] | None = None):
    parser = cli.ArgumentParser(
        "train", description="Train DeepLabv3+ on CAM5 climate data (single process, horovodrun or srun).",
        epilog="Overrides are dotted keys, e.g. optimizer.lr=0.002 data.root=/dev/shm/cam "
               "train.max_steps=100. Every key: docs/config.md.")
    parser.add_argument("--config", required=True, help="YAML file, e.g. yaml/demo.yaml")
    parser.add_argument("--engine", choices=dist.ENGINES, help="dist.engine: horovod "
                        "(horovodrun, srun with MPI) or torch (torchrun, srun); docs/engines.md")
    parser.add_argument("--force", action="store_true", help="overwrite=true: start over in "
                        "an output_dir holding another run, moving that run aside to "
                        "OUTPUT.replaced-DATE")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # --engine may follow overrides
    if args.engine is not None:
        args.overrides.append(f"dist.engine={args.engine}")
    if args.force:
        args.overrides.append("overwrite=true")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 an error (one line), 3 stopped by a signal with a checkpoint."""
    args = parse_args(argv)
    SIGNALS.install()  # before Horovod starts: a signal during start-up is a stop, not a death
    try:
        cfg = load_config(args.config, args.overrides)  # first: it names the engine
        dist.init(cfg.dist.engine)
    except (ConfigError, RuntimeError) as err:
        return cli.fail("train", str(err))
    setup_logging(dist.rank(), dist.size())
    try:
        summary = train(cfg)
    except RUN_ERRORS + (RunError, DivergenceError) as err:
        log.error("error: %s", err)
        return EXIT_ERROR
    except Exception as err:
        if not dist.is_shutdown_error(err):
            raise
        # Another rank ended (its own error is its one line); this one was only told to stop.
        log.error("error: stopped because another rank failed or stopped responding; its error, if any, is above")
        return EXIT_ERROR
    return EXIT_STOPPED if summary["stop_reason"].startswith("stopped") else EXIT_OK

"""``climseg train`` (``python -m climseg.train``): the command line around
:func:`climseg.train.train`, and its exit statuses (docs/reliability.md)."""

from __future__ import annotations

import json
import logging

from climseg import cli, dist
from climseg.config import ConfigError, load_config
from climseg.control import SIGNALS
from climseg.errors import RUN_ERRORS, DivergenceError, RunError
from climseg.logs import setup_logging
from climseg.train import EXIT_ERROR, EXIT_OK, EXIT_STOPPED, train

log = logging.getLogger("climseg.train")


# The flags every climseg command shares, as the config keys they set (README, "Flags").
FLAG_KEYS = [("--data", "data.root", "data-set root holding <split>/data-*.h5 and stats.h5"),
             ("--output", "output_dir", "run folder: checkpoints, logs, config.yaml"),
             ("--workers", "data.loader_threads", "files read at once per rank: reader threads")]


def parse_args(argv: list[str] | None = None):
    parser = cli.ArgumentParser(
        "train", description="Train DeepLabv3+ on CAM5 climate data (single process, horovodrun or srun).",
        epilog="Overrides are dotted keys, e.g. optimizer.lr=0.002 data.root=/dev/shm/cam "
               "train.max_steps=100. Every key: docs/config.md.")
    parser.add_argument("--config", required=True, help="YAML file, e.g. yaml/demo.yaml")
    for flag, key, what in FLAG_KEYS:
        parser.add_option(flag, metavar=flag.lstrip("-").upper(), help=f"{what} ({key}=...)",
                          **({"type": cli.positive_int} if flag == "--workers" else {}))
    parser.add_argument("--engine", choices=dist.ENGINES, help="dist.engine: horovod "
                        "(horovodrun, srun with MPI) or torch (torchrun, srun); docs/engines.md")
    parser.add_argument("--force", action="store_true", help="overwrite=true: start over in "
                        "an output_dir holding another run, moving that run aside to "
                        "OUTPUT.replaced-DATE")
    parser.add_quiet("no progress or log lines on stderr, only warnings and errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_intermixed_args(argv)  # flags may follow overrides
    # A flag is a shorter spelling of its config key; given after the overrides, it wins.
    # Paths are quoted: a folder named 2024 or null stays a string when read as YAML.
    for flag, key, _ in FLAG_KEYS + [("--engine", "dist.engine", "")]:
        value = getattr(args, flag.lstrip("-"))
        if value is not None:
            text = value if isinstance(value, int) else json.dumps(value)
            args.overrides.append(f"{key}={text}")
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
    setup_logging(dist.rank(), dist.size(), quiet=args.quiet)
    try:
        summary = train(cfg)
    except RUN_ERRORS + (RunError, DivergenceError) as err:
        log.error("error: %s", err)
        return EXIT_ERROR
    except Exception as err:
        if not dist.is_shutdown_error(err):
            raise
        # Another rank ended (its own error is its one line); this one was only told to stop.
        log.error("error: %s", dist.shutdown_line())
        return EXIT_ERROR
    return EXIT_STOPPED if summary["stop_reason"].startswith("stopped") else EXIT_OK

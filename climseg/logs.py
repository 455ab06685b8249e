"""One logging set-up for every climseg command.

Logs and progress go to stderr; results a user may redirect (the evaluate table, the summarize
table, check's problem list) are printed to stdout by the command itself. Rank 0 logs at INFO,
the other ranks only warnings and errors, each line tagged ``[rank] `` when there are several.
"""

from __future__ import annotations

import logging
import sys

# The handler this module installs carries this name, so that a second call (a test calling
# several mains in one process) replaces it instead of doubling every line, while handlers
# installed by others (pytest's log capture) are left alone.
_HANDLER_NAME = "climseg"


def setup_logging(rank: int = 0, size: int = 1, quiet: bool = False) -> None:
    """Send ``logging`` records to stderr: INFO on rank 0, WARNING elsewhere or when ``quiet``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    tag = f"[{rank}] " if size > 1 else ""
    handler.setFormatter(logging.Formatter(f"%(asctime)s {tag}%(message)s", datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO if rank == 0 and not quiet else logging.WARNING)

"""What the tools/*.py aliases share: find a climseg command's main and run it.

A checkout whose venv predates `make install` installing climseg has no importable package:
then the one next to these scripts is used. Only a missing climseg falls back; any other
missing module is a real error and is raised as it is.
"""

import importlib
import sys
from pathlib import Path


def run(module: str, function: str) -> None:
    """Exit with the status of ``module.function()`` (a climseg command's ``main``)."""
    try:
        target = importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != "climseg":
            raise
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        target = importlib.import_module(module)
    sys.exit(getattr(target, function)())

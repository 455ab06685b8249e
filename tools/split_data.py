#!/usr/bin/env python
"""Alias of `climseg split` (`climseg split --help` for its options); kept so that existing
command lines, with their older flag spellings, keep working."""

import sys
from pathlib import Path

try:
    from climseg.data.tools import split_main
except ModuleNotFoundError as err:
    # A checkout whose venv predates `make install` installing climseg: use the package
    # next to this script. Only a missing climseg falls back; any other missing module is
    # a real error and is raised as it is.
    if err.name != "climseg":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from climseg.data.tools import split_main

if __name__ == "__main__":
    sys.exit(split_main())

#!/usr/bin/env python
"""Alias of `climseg convert-climatenet`: ClimateNet's netCDF4 files to climseg samples.

Example:
  python tools/convert_climatenet.py --data climatenet/train --output data/climatenet/train-all
"""

import sys
from pathlib import Path

try:
    from climseg.data.climatenet import main
except ModuleNotFoundError as err:
    # A venv without climseg installed: use the package next to this script. Only a missing
    # climseg falls back; any other missing module is a real error.
    if err.name != "climseg":
        raise
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from climseg.data.climatenet import main

if __name__ == "__main__":
    sys.exit(main())

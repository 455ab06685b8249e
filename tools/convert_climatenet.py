#!/usr/bin/env python
"""Alias of `climseg convert-climatenet`: ClimateNet's netCDF4 files to climseg samples.

Example:
  python tools/convert_climatenet.py --data climatenet/train --output data/climatenet/train-all
"""

from _alias import run

if __name__ == "__main__":
    run("climseg.data.climatenet", "main")

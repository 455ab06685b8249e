#!/usr/bin/env python
"""Alias of `climseg stage` (`climseg stage --help` for its options); kept so that existing
command lines, with their older flag spellings, keep working."""

from _alias import run

if __name__ == "__main__":
    run("climseg.data.tools", "stage_main")

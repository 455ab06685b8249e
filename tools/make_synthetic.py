#!/usr/bin/env python
"""Alias of `climseg make-synthetic` (`climseg make-synthetic --help` for its options); kept so that existing
command lines, with their older flag spellings, keep working."""

from _alias import run

if __name__ == "__main__":
    run("climseg.data.tools", "make_synthetic_main")

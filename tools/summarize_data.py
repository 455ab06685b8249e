#!/usr/bin/env python
"""Alias of `climseg summarize` (`climseg summarize --help` for its options); kept so that existing
command lines, with their older flag spellings, keep working."""

from _alias import run

if __name__ == "__main__":
    run("climseg.data.tools", "summarize_main")

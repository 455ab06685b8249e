"""Shared test fixtures: a tiny synthetic data set, generated once per test session.

``tiny_root`` is a data-set root laid out like the real one::

    ROOT/train/data-*.h5       16 samples  (symlinks into ROOT/../raw)
    ROOT/validation/data-*.h5   2 samples
    ROOT/test/data-*.h5         2 samples
    ROOT/stats.h5              statistics of ROOT/train

with samples of TINY_SHAPE = (64, 96, 16). Treat it as read-only; copy it if a test must
change files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from climseg.data.split import split_dataset  # noqa: E402
from climseg.data.summarize import summarize_split  # noqa: E402
from climseg.data.synthetic import generate_dataset  # noqa: E402

TINY_HEIGHT, TINY_WIDTH = 64, 96
TINY_SHAPE = (TINY_HEIGHT, TINY_WIDTH, 16)
TINY_SAMPLES = 20
TINY_SEED = 7


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """Root of a tiny split synthetic data set with stats.h5 (see the module docstring)."""
    base = tmp_path_factory.mktemp("tiny_data")
    generate_dataset(base / "raw", TINY_SAMPLES, TINY_SEED, height=TINY_HEIGHT,
                     width=TINY_WIDTH, progress=False)
    root = base / "root"
    split_dataset(base / "raw", root)
    summarize_split(root, "train", progress=False)
    return root

"""Shared test fixtures: a tiny synthetic data set, generated once per test session.

``tiny_root`` is a data-set root laid out like the real one::

    ROOT/train/data-*.h5       16 samples  (symlinks into ROOT/../raw)
    ROOT/validation/data-*.h5   2 samples
    ROOT/test/data-*.h5         2 samples
    ROOT/stats.h5              statistics of ROOT/train

with samples of TINY_SHAPE = (64, 96, 16). Treat it as read-only; copy it if a test must
change files.

Horovod: a test that needs it takes the ``horovod`` fixture (or calls ``require_horovod()``),
which skips when Horovod is not installed, or fails when ``CLIMSEG_REQUIRE_HOROVOD=1`` (as
``make test`` sets it: there a missing Horovod is a broken install, not a reason to test less).
As a net for tests that skip on their own, the same variable turns any skip whose reason
mentions Horovod into a failure.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path

import pytest

from climseg.data.split import split_dataset
from climseg.data.summarize import summarize_split
from climseg.data.synthetic import generate_dataset

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


REQUIRE_HOROVOD = os.environ.get("CLIMSEG_REQUIRE_HOROVOD") == "1"
HOROVODRUN = Path(sys.executable).parent / "horovodrun"


@functools.cache
def horovod_missing() -> str | None:
    """Why Horovod cannot be used here (no horovodrun next to this Python, or horovod.torch
    does not import), or None when it can."""
    if not HOROVODRUN.exists():
        return f"{HOROVODRUN} not found"
    try:
        import horovod.torch  # noqa: F401
    except ImportError as err:
        return f"horovod.torch does not import ({err})"
    return None


def require_horovod() -> None:
    """Skip the calling test without Horovod; fail it instead under CLIMSEG_REQUIRE_HOROVOD=1."""
    missing = horovod_missing()
    if missing is None:
        return
    if REQUIRE_HOROVOD:
        pytest.fail(f"CLIMSEG_REQUIRE_HOROVOD=1 but {missing}; run make install", pytrace=False)
    pytest.skip(f"horovod not installed: {missing} (make install builds it)")


@pytest.fixture
def horovod() -> None:
    """Use in a test that runs Horovod: see :func:`require_horovod`."""
    require_horovod()


def _fail_horovod_skip(report) -> None:
    if not (REQUIRE_HOROVOD and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if "horovod" in reason.lower():
        report.outcome = "failed"
        report.longrepr = f"CLIMSEG_REQUIRE_HOROVOD=1 turns this skip into a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_horovod_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a module-level pytest.importorskip("horovod.torch") skips at collection
    outcome = yield
    _fail_horovod_skip(outcome.get_result())


def wait_for(condition, proc, log: Path, timeout: float = 400) -> None:
    """Poll ``condition`` while the background run ``proc`` (output in ``log``) is alive; fail
    with the log's tail if the run ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)

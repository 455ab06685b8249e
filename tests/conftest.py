"""Shared test fixtures and the suite's rules: a tiny synthetic data set generated once per
session, the install parts a test may need, and the two speeds.

``tiny_root`` is a data-set root laid out like the real one::

    ROOT/train/data-*.h5       16 samples  (symlinks into ROOT/../raw)
    ROOT/validation/data-*.h5   2 samples
    ROOT/test/data-*.h5         2 samples
    ROOT/stats.h5              statistics of ROOT/train

with samples of TINY_SHAPE = (64, 96, 16). Treat it as read-only; copy it if a test must
change files.

Install parts. A test that needs Horovod takes the ``horovod`` fixture (or calls
``require_horovod()``); one that needs ``mpiexec`` (the pinned PyPI ``mpich`` provides it) takes
the ``mpiexec`` fixture. Without them the test skips, except under ``CLIMSEG_REQUIRE_INSTALL=1``,
which ``make test`` and ``make test-fast`` set: there a missing part of ``make install`` is a
broken install, and every skip fails unless its reason matches ``ALLOWED_SKIPS``: no GPU (or a
GPU where a test needs none), Slurm (a system service outside ``make install``;
``CLIMSEG_REQUIRE_SLURM=1``, which ``.ci/run`` sets where it installed Slurm, fails those too),
and set-ups that need root's rights where they are missing. ``CLIMSEG_REQUIRE_HOROVOD``
(default: the value of ``CLIMSEG_REQUIRE_INSTALL``) says the same of Horovod alone: ``=0``
allows Horovod's skips in an install without it. mlperf-logging is a dependency of climseg
itself: its tests import it, so its absence is an error in every run.

Two speeds. ``slow`` marks every test that launches ranks (``multiprocess``: horovodrun,
mpiexec, srun, sbatch), trains beyond a step, or takes more than ~5 s of CPU time;
``make test-fast`` runs ``-m "not slow"``. Tests that take the ``horovod``, ``slurm`` or
``mpiexec`` fixture are marked here; the others carry the mark in their file, or, for files
listed in ``SLOW_TESTS``, by name here. A test not marked ``multiprocess`` that starts a rank
launcher fails, naming the launcher: the mark cannot silently fall behind the test.

Two workers. ``make test`` runs the suite in two pytest-xdist workers, ``--dist loadfile``:
about half of its wall time is runs waiting (for a signal to act, a timeout, Slurm), so a
second worker fills the idle core. A file's tests stay on one worker, so its module fixtures
(reference runs, a cluster) run once. Every test must therefore stand another test's load
beside it, which the suite's runs do: each multi-process file was run five times beside two
busy loops. Tests share nothing across files but ``tiny_root`` (one per worker); the one-node
Slurm and the two-node cluster keep every path, socket and port in their own folders and
namespaces, so the two can run at once.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
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


REQUIRE_INSTALL = os.environ.get("CLIMSEG_REQUIRE_INSTALL") == "1"
REQUIRE_HOROVOD = os.environ.get("CLIMSEG_REQUIRE_HOROVOD", "1" if REQUIRE_INSTALL else "0") == "1"
REQUIRE_SLURM = os.environ.get("CLIMSEG_REQUIRE_SLURM") == "1"
HOROVODRUN = Path(sys.executable).parent / "horovodrun"

# The skips that stay skips under CLIMSEG_REQUIRE_INSTALL=1 (matched in the reason): hardware
# this machine has or lacks, and what `make install` does not install or cannot set up.
ALLOWED_SKIPS = [re.compile(r"\b(cuda|gpu|nccl)\b", re.I), re.compile(r"\bneeds root\b")]
if not REQUIRE_SLURM:
    ALLOWED_SKIPS.append(re.compile(r"\bslurm", re.I))
if not REQUIRE_HOROVOD:
    ALLOWED_SKIPS.append(re.compile(r"\bhorovod", re.I))


def missing_install_part(reason: str) -> None:
    """Skip the calling test for a missing part of ``make install`` named in ``reason``; fail
    it instead where the install is required (see the module docstring)."""
    if REQUIRE_HOROVOD if "horovod" in reason.lower() else REQUIRE_INSTALL:
        pytest.fail(f"{reason}; a broken install under CLIMSEG_REQUIRE_INSTALL/"
                    "CLIMSEG_REQUIRE_HOROVOD (run make install)", pytrace=False)
    pytest.skip(reason)


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
    """Skip the calling test without Horovod (fail it where Horovod is required)."""
    missing = horovod_missing()
    if missing is not None:
        missing_install_part(f"horovod not installed: {missing} (make install builds it)")


@pytest.fixture(scope="session")
def horovod() -> None:
    """Use in a test (or a fixture) that runs Horovod: see :func:`require_horovod`."""
    require_horovod()


def find_mpiexec() -> str | None:
    """The mpiexec next to this Python (the pinned mpich's), else the one on PATH."""
    return (shutil.which("mpiexec", path=str(Path(sys.executable).parent))
            or shutil.which("mpiexec"))


@pytest.fixture(scope="session")
def mpiexec() -> str:
    """The path of mpiexec; a missing one is a missing install part."""
    path = find_mpiexec()
    if path is None:
        missing_install_part("mpiexec not found next to this Python or on PATH "
                             "(requirements.txt's mpich provides it)")
    return path


def _fail_disallowed_skip(report) -> None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    if REQUIRE_INSTALL:
        disallowed = not any(pattern.search(reason) for pattern in ALLOWED_SKIPS)
    else:
        disallowed = REQUIRE_HOROVOD and "horovod" in reason.lower()
    if disallowed:
        report.outcome = "failed"
        report.longrepr = ("CLIMSEG_REQUIRE_INSTALL/CLIMSEG_REQUIRE_HOROVOD turn this skip into "
                           f"a failure (not one of conftest.ALLOWED_SKIPS): {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # a module-level pytest.importorskip(...) skips at collection
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


# --- two speeds -------------------------------------------------------------------------------
# Fixtures whose tests launch ranks.
MULTIPROCESS_FIXTURES = {"horovod", "slurm", "mpiexec"}
# Tests in files whose owners mark by name here (file: {test name without parameters: marks}):
# runs of the trainer under horovodrun ("multiprocess"), or in one process beyond a step.
SLOW_TESTS: dict[str, dict[str, tuple[str, ...]]] = {
    "test_elastic.py": {
        "test_one_rank_elastic_run_is_the_plain_run": ("slow",),
        "test_staged_per_rank_data_is_refused": ("slow",),
        "test_elastic_run_survives_losing_rank_0_and_takes_a_rank_back": ("multiprocess",),
        "test_a_rank_lost_before_the_first_commit_rolls_back_to_the_resumed_step":
            ("multiprocess",),
        "test_elastic_checkpoint_resumes_on_another_rank_count": ("multiprocess",),
    },
    "test_train.py": {
        "test_single_process_outputs": ("slow",),
        "test_tensorboard_has_scalars_and_image": ("slow",),
        "test_mlperf_log_parses": ("slow",),
        "test_checkpoint_records_its_own_evaluation_as_best": ("slow",),
        "test_epoch_budget_is_reported_as_such": ("slow",),
        "test_two_ranks_keep_identical_parameters": ("multiprocess",),
        "test_two_rank_mlperf_log_fails_the_checker_only_on_the_quality_target":
            ("multiprocess",),
        "test_two_ranks_loss_falls": ("multiprocess",),
        "test_resume_matches_uninterrupted_run": ("multiprocess",),
        "test_two_ranks_fp16_horovod_recipe": ("multiprocess",),
        "test_two_ranks_batchnorm_group_of_two_on_cpu": ("multiprocess",),
    },
    "test_batchnorm.py": {
        "test_two_groups_of_two_match_one_batchnorm_per_group": ("multiprocess",),
        "test_group_of_one_is_plain_batchnorm": ("multiprocess",),
        "test_group_size_zero_is_all_ranks": ("multiprocess",),
    },
    "test_faults.py": {
        "test_sigterm_on_one_rank_stops_every_rank_with_a_checkpoint": ("multiprocess",),
        "test_stopped_run_resumes_with_the_losses_of_an_uninterrupted_run": ("multiprocess",),
        "test_kill_9_of_one_rank_then_resume_auto_continues_identically": ("multiprocess",),
    },
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        named = SLOW_TESTS.get(item.path.name, {}).get(item.originalname, ())
        if MULTIPROCESS_FIXTURES & set(item.fixturenames) or "multiprocess" in named:
            item.add_marker(pytest.mark.multiprocess)
        if item.get_closest_marker("multiprocess") or "slow" in named:
            item.add_marker(pytest.mark.slow)


# Rank launchers: a test that starts one must be marked multiprocess (and so slow).
LAUNCHERS = {"horovodrun", "mpiexec", "mpirun", "srun", "sbatch"}
_current_item: list = [None]


def _launcher_of(args) -> str | None:
    if isinstance(args, (str, bytes, os.PathLike)):
        args = shlex.split(os.fsdecode(args)) if isinstance(args, (str, bytes)) else [args]
    name = Path(os.fsdecode(args[0])).name if args else ""
    return name if name in LAUNCHERS else None


_popen_init = subprocess.Popen.__init__


def _checked_popen_init(self, args, *rest, **kwargs):
    item = _current_item[0]
    launcher = _launcher_of(args)
    if launcher and item is not None and not item.get_closest_marker("multiprocess"):
        pytest.fail(f"{item.nodeid} starts {launcher} but is not marked multiprocess: mark it "
                    "(tests/conftest.py says how) so that make test-fast leaves it out",
                    pytrace=False)
    _popen_init(self, args, *rest, **kwargs)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Module fixtures start their runs inside the first test that uses them: the same item.
    _current_item[0] = item
    subprocess.Popen.__init__ = _checked_popen_init
    try:
        yield
    finally:
        subprocess.Popen.__init__ = _popen_init
        _current_item[0] = None


# Seconds after which a test run counts as hung: a bound for subprocess timeouts and waits, far
# above what runs take on 2 loaded cores (seconds to a few minutes), never a speed check.
HUNG_S = 600


def wait_for(condition, proc, log: Path, timeout: float = HUNG_S) -> None:
    """Poll ``condition`` while the background run ``proc`` (output in ``log``) is alive; fail
    with the log's tail if the run ends first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-4000:]}"
        time.sleep(0.5)

"""Batch norm over groups of ranks: the group arithmetic in one process, and the statistics and
gradients under ``horovodrun -np 4 --gloo`` against one BatchNorm2d fed each group's batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from climseg.batchnorm import GroupBatchNorm2d, convert_batchnorm, group_ranks, resolve_group_size

# Ranks or training in (nearly) every test: out of make test-fast, and the launcher guard's
# multiprocess mark (tests/conftest.py).
pytestmark = pytest.mark.multiprocess

REPO = Path(__file__).resolve().parent.parent
HOROVODRUN = Path(sys.executable).parent / "horovodrun"
TOL = 1e-5   # float32 arithmetic in a different order than one BatchNorm2d


def test_group_size_resolution():
    assert resolve_group_size(None, 8) == 8
    assert resolve_group_size(0, 8) == 8
    assert resolve_group_size(1, 8) == 1
    assert resolve_group_size(4, 8) == 4
    with pytest.raises(ValueError, match="train.batchnorm_group_size: 3 does not divide the 8"):
        resolve_group_size(3, 8)
    with pytest.raises(ValueError, match="train.batchnorm_group_size"):
        resolve_group_size(-2, 8)
    assert group_ranks(5, 2) == [4, 5]
    assert group_ranks(5, 4) == [4, 5, 6, 7]
    assert group_ranks(0, 1) == [0]


def test_single_process_keeps_plain_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    converted = convert_batchnorm(model, None)   # no Horovod started: one rank
    assert type(converted[1]) is nn.BatchNorm2d


def test_without_a_process_set_it_is_batchnorm2d():
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(3)
    group = GroupBatchNorm2d.from_batchnorm(plain, None)
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(group(x), plain(x))
    assert set(group.state_dict()) == set(plain.state_dict())   # checkpoints stay loadable


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    if not HOROVODRUN.exists():
        if os.environ.get("CLIMSEG_REQUIRE_HOROVOD") == "1":
            pytest.fail(f"{HOROVODRUN} not found; run tools/install_horovod.sh")
        pytest.skip("horovod is not installed (make test installs it)")
    out = tmp_path_factory.mktemp("group_bn")
    # Groups are process sets added after init: Horovod needs dynamic process sets.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               HOROVOD_DYNAMIC_PROCESS_SETS="1")
    cmd = [str(HOROVODRUN), "-np", "4", "-H", "localhost:4", "--gloo", sys.executable,
           str(REPO / "tests" / "scripts" / "group_batchnorm.py"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def assert_matches_reference(result: dict) -> None:
    for step in result["steps"]:
        assert step["output"] <= TOL * max(1.0, step["output_scale"])
        assert step["input_grad"] <= TOL
        assert step["param_grad"] <= TOL * max(1.0, step["param_grad_scale"])
    assert result["running"] <= TOL
    assert result["eval_output"] <= TOL
    assert result["batches_tracked"] == [2, 2]


def test_two_groups_of_two_match_one_batchnorm_per_group(four_ranks):
    results = [r["2"] for r in four_ranks]
    assert [r["members"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    for result in results:
        assert result["bn_types"] == ["GroupBatchNorm2d"]
        assert_matches_reference(result)
    means = [torch.tensor(r["running_mean"]) for r in results]
    assert torch.equal(means[0], means[1]) and torch.equal(means[2], means[3])
    assert (means[0] - means[2]).abs().max() > 1e-3   # the groups saw different data


def test_group_of_one_is_plain_batchnorm(four_ranks):
    results = [r["1"] for r in four_ranks]
    for result in results:
        assert result["bn_types"] == ["BatchNorm2d"] and not result["is_group_bn"]
        assert_matches_reference(result)
    means = [tuple(r["running_mean"]) for r in results]
    assert len(set(means)) == 4


def test_group_size_zero_is_all_ranks(four_ranks):
    results = [r["0"] for r in four_ranks]
    for result in results:
        assert result["members"] == [0, 1, 2, 3]
        assert_matches_reference(result)
    assert len({tuple(r["running_mean"]) for r in results}) == 1

"""Break the training on purpose, once per fault, and check that the equivalence tests fail.

    python tests/scripts/mutants.py [NAME ...]      (from the repository root, venv active)

Each mutant is a one-line change to climseg (a wrong data order, a step lost at a resume, a
rank whose data does not train, every rank reading the same samples). For each, a copy of the
committed tree gets the change and runs the tests that must catch it; the table at the end
says, per test, whether it failed (caught) or passed (missed). Nothing in this tree changes.
The copies live in a temporary folder that is removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The equivalence tests the mutants are run against.
RESUME = "tests/test_train.py::test_resume_matches_uninterrupted_run"
STOPPED = ("tests/test_faults.py::"
           "test_stopped_run_resumes_with_the_losses_of_an_uninterrupted_run")
REQUEUE = ("tests/test_cluster.py::test_two_node_sbatch_requeued_by_the_warning_signal_"
           "finishes_with_uninterrupted_losses")
ELASTIC_TWO_RANKS = ("tests/test_elastic.py::"
                     "test_two_ranks_with_accumulation_2_train_as_one_process_with_accumulation_4")
TORCH_TWO_RANKS = ("tests/test_engine_torch.py::"
                   "test_two_torch_ranks_match_one_process_with_accumulation")
BN_GROUP = "tests/test_train.py::test_two_ranks_batchnorm_group_of_two_on_cpu"
ELASTIC_TWO_NODES = ("tests/test_cluster.py::"
                     "test_elastic_run_survives_losing_node2_and_takes_it_back")

# name: (file, the line as it is, the line broken, why it is a fault, tests that must fail)
MUTANTS = {
    "resume-restarts-the-epoch": (
        "climseg/data/loader.py",
        "starts = deque(range(start_batch * bs, len(plan), bs))",
        "starts = deque(range(0, len(plan), bs))",
        "a resumed run reads its epoch from the first batch again (wrong data order)",
        [RESUME, STOPPED, REQUEUE,
         "tests/test_elastic.py::test_elastic_run_survives_losing_rank_0_and_takes_a_rank_back",
         ELASTIC_TWO_NODES]),
    "a-step-lost-at-resume": (
        "climseg/checkpoint.py",
        "return Progress(**meta[\"progress\"])",
        "return Progress(**{**meta[\"progress\"], \"step\": meta[\"progress\"][\"step\"] + 1})",
        "the resumed run counts one step it never took (a skipped step)",
        [RESUME, STOPPED, REQUEUE]),
    "rank-1-does-not-train": (
        "climseg/engine.py",
        "scaled = loss / len(micro_batches)",
        "scaled = loss / len(micro_batches) * float(dist.rank() == 0)",
        "rank 1's samples add nothing to the gradient (an untrained rank)",
        [ELASTIC_TWO_RANKS, TORCH_TWO_RANKS, BN_GROUP]),
    "elastic-ranks-read-the-same-samples": (
        "climseg/data/loader.py",
        "positions = positions[:, rank::ranks].reshape(-1)",
        "positions = positions[:, 0::ranks].reshape(-1)",
        "every rank reads rank 0's share of each global batch of the elastic order (wrong "
        "data order)",
        [ELASTIC_TWO_RANKS]),
    "ranks-read-the-same-files": (
        "climseg/data/partition.py",
        "mine = list(files[rank::size])",
        "mine = list(files[0::size])",
        "every rank reads rank 0's files in a plain (not elastic) run (wrong data order)",
        [TORCH_TWO_RANKS, BN_GROUP]),
}


def mutate(tree: Path, file: str, old: str, new: str) -> None:
    path = tree / file
    text = path.read_text()
    if text.count(old) != 1:
        sys.exit(f"mutants: {file}: the line to break is not there once: {old!r}")
    path.write_text(text.replace(old, new))


def run_tests(tree: Path, tests: list[str]) -> dict[str, str]:
    """Each test's outcome in ``tree``: caught (it failed), missed (it passed) or skipped."""
    env = {**os.environ, "PYTHONPATH": str(tree), "CLIMSEG_REQUIRE_INSTALL": "1",
           "CLIMSEG_REQUIRE_HOROVOD": "1", "CLIMSEG_REQUIRE_SLURM": "1"}
    outcome = {}
    for test in tests:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "-rA", test], cwd=tree, env=env, capture_output=True, text=True)
        if done.returncode == 0:
            skipped = " skipped" in done.stdout and " passed" not in done.stdout
            outcome[test] = "skipped" if skipped else "missed"
        elif done.returncode == 1:
            outcome[test] = "caught"
        else:
            outcome[test] = f"error (pytest status {done.returncode})"
    return outcome


def main(names: list[str]) -> int:
    names = names or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        sys.exit(f"mutants: unknown mutant {unknown[0]} (one of: {', '.join(MUTANTS)})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="climseg-mutants-") as scratch:
        for name in names:
            file, old, new, why, tests = MUTANTS[name]
            tree = Path(scratch) / name
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                            str(tree), "HEAD"], check=True)
            try:
                mutate(tree, file, old, new)
                start = time.perf_counter()
                print(f"mutants: {name}: {why}", file=sys.stderr, flush=True)
                for test, result in run_tests(tree, tests).items():
                    rows.append((name, test.split("/", 1)[1], result))
                    print(f"  {result:8} {test}", file=sys.stderr, flush=True)
                print(f"  ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            finally:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                                str(tree)], check=False)
    print("| mutant | test | result |\n| --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(result == "caught" for _, _, result in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

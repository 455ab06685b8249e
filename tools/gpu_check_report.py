#!/usr/bin/env python
"""The table at the end of tools/gpu_check.sh: every measurement of the run in one table,
then the issue's targets next to what was measured, the CUDA tests' outcome and any phase
that failed or was skipped.

    python tools/gpu_check_report.py RESULTS_DIR [--skipped NAME ...] [--failed NAME ...]

RESULTS_DIR holds the JSON files the check's phases wrote (step.json, step_compiled.json,
optim.json, loader.json, train.json) and test_cuda.xml; missing ones are reported as missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))

from climseg.bench.common import Result, format_table  # noqa: E402

# The targets on one H100, full 768x1152 samples, bf16 (issue 9, "Needs a GPU").
STEP_TARGET = 110.0       # samples/s, data already on the GPU, batch 8
TRAIN_TARGET = 100.0      # samples/s end to end
DATA_WAIT_TARGET = 0.05   # of step time
PEAK_TARGET_GIB = 24.0
LAMB_SHARE_TARGET = 0.05  # of step time


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _results(record: dict | None) -> list[Result]:
    if not record:
        return []
    return [Result(**row) for row in record["results"]]


def _tests(path: Path) -> str:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return "no result (the test phase did not run or did not finish)"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return (f"{counts['tests']} run, {counts['failures'] + counts['errors']} failed, "
            f"{counts['skipped']} skipped")


def _verdict(value: float | None, target: float, at_least: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= target if at_least else value <= target
    return "met" if met else "NOT met"


def report(results_dir: Path, skipped: list[str], failed: list[str]) -> str:
    step, compiled = _read(results_dir / "step.json"), _read(results_dir / "step_compiled.json")
    loader, train = _read(results_dir / "loader.json"), _read(results_dir / "train.json")
    optim = _read(results_dir / "optim.json")
    rows = _results(step) + _results(compiled) + _results(loader) + _results(train)

    env = next((r["environment"] for r in (step, train, loader) if r), {})
    lines = [f"GPU check: {env.get('gpu', 'no GPU')}, torch {env.get('torch', '?')}, "
             f"{env.get('cpus', '?')} CPUs, {env.get('time_utc', '')}", ""]
    lines.append(format_table(rows) if rows else "(no measurements)")
    if loader and "speedup" in loader["summary"]:
        s = loader["summary"]
        lines.append(f"loader: {s['climseg_best']} / {s['reference_best']}: {s['speedup']:.2f}x, "
                     f"model input {s.get('model_input', '?')}")

    best_step = max(_results(step) + _results(compiled), key=lambda r: r.samples_per_s,
                    default=None)
    lamb_share = lamb_ms = None
    if optim and step:
        lamb_ms = optim["optimizers"]["lamb"]["wall_ms"]
        lamb_share = lamb_ms / _results(step)[0].ms_per_step
    train_row = (_results(train) or [None])[0]
    targets = [
        ("step, data on the GPU (samples/s)", STEP_TARGET, True,
         best_step and best_step.samples_per_s),
        ("train end to end (samples/s)", TRAIN_TARGET, True, train_row and train_row.samples_per_s),
        ("train data wait (share of step)", DATA_WAIT_TARGET, False,
         train_row and train_row.data_wait_share),
        ("peak GPU memory at batch 8 (GiB)", PEAK_TARGET_GIB, False,
         best_step and best_step.peak_memory_gib),
        ("LAMB step (share of the step)", LAMB_SHARE_TARGET, False, lamb_share),
    ]
    lines += ["", f"{'target':38s} {'wanted':>8s} {'measured':>9s}  verdict"]
    for name, target, at_least, value in targets:
        shown = "-" if value is None else f"{value:.3g}"
        lines.append(f"{name:38s} {('>= ' if at_least else '<= ') + format(target, 'g'):>8s} "
                     f"{shown:>9s}  {_verdict(value, target, at_least)}")
    if lamb_ms is not None:
        adamw = optim["optimizers"].get("adamw", {}).get("wall_ms")
        lines.append(f"LAMB step {lamb_ms:.1f} ms" + (f" (AdamW {adamw:.1f} ms)" if adamw else ""))
    if compiled:
        lines.append(f"compile: first step {compiled['summary']['first_step_s']:.1f} s")
    lines += ["", f"CUDA tests: {_tests(results_dir / 'test_cuda.xml')}"]
    if failed:
        lines.append("FAILED phases: " + ", ".join(failed))
    if skipped:
        lines.append("skipped (time budget): " + ", ".join(skipped))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--skipped", nargs="*", default=[])
    parser.add_argument("--failed", nargs="*", default=[])
    args = parser.parse_args(argv)
    if not args.results.is_dir():
        print(f"gpu_check_report: error: {args.results}: no such folder", file=sys.stderr)
        return 2
    print(report(args.results, args.skipped, args.failed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/config.md, generated: every config key with its type and default (read from the
dataclasses of :mod:`climseg.config`) and its description (kept here, in :data:`DESCRIPTIONS`).

``python -m climseg.config_doc --output docs/config.md`` (or ``make docs``) rewrites the page;
``tests/test_docs.py`` fails when the page, the dataclasses and the descriptions drift apart.
The descriptions live in this module rather than in config.py so that adding a key there is a
one-line change and its documentation a separate, reviewable one.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Iterator

import yaml

from climseg.atomic import atomic_path
from climseg.config import Config

GENERATOR = "python -m climseg.config_doc --output docs/config.md"

# One line per section of the config (a dataclass field of Config); "" is the top level.
SECTIONS: dict[str, str] = {
    "": "Where the run writes, its seed and what it resumes from.",
    "data": "The data set and how it is read.",
    "model": "The network.",
    "loss": "The weighted cross-entropy.",
    "optimizer": "The optimizer and its gradient clipping.",
    "scheduler": "The learning-rate schedule, stepped every optimizer step.",
    "train": "Batch layout, budgets, validation, checkpoints, precision and distribution.",
    "dist": "How the ranks talk to each other (docs/engines.md).",
}

# Dotted key -> one paragraph of Markdown. Every key of Config needs one; tests/test_docs.py
# says which are missing after a key is added.
DESCRIPTIONS: dict[str, str] = {
    "dist.engine": "`horovod` (the default: `horovodrun`, or `srun` with an MPI-built Horovod) "
                   "or `torch` (`torch.distributed`: NCCL on CUDA, Gloo on CPU; `torchrun`, or "
                   "a plain `srun`). `climseg train --engine` sets it too. `train.elastic` "
                   "needs `horovod`.",
    "output_dir": "Where the run writes everything: `config.yaml`, checkpoints, `mlperf.log`, "
                  "`metrics.jsonl`, `tensorboard/`. One run at a time may use it (a lock).",
    "seed": "Seeds model initialization, data order and crops; must be > 0. MLPerf forbids "
            "submitting several runs with the same seed: override it per run "
            "([mlperf.md](mlperf.md#seeds)).",
    "resume": "`none`, `auto` (the newest readable checkpoint in `output_dir`, or a fresh start "
              "when there is none) or the path of a checkpoint "
              "([training.md](training.md#resuming)). A resume is refused, before anything in "
              "`output_dir` changes, when the checkpoint's model (name, channels, classes), "
              "normalization, optimizer or data (a fingerprint of the statistics and of the "
              "file names, not of their path) differ from this run's.",
    "overwrite": "`true` (`climseg train --force`): start over in an `output_dir` that holds "
                 "another run: everything in it is moved aside, nothing deleted, to the "
                 "sibling folder `OUTPUT.replaced-YYYYmmdd-HHMMSS`. Without it a run that does "
                 "not continue the folder's checkpoints (`resume=auto`, or a checkpoint of that "
                 "folder) is refused. Not with `resume=auto`.",
    "data.root": "The data-set root, holding `<split>/data-*.h5` and `stats.h5`. Required.",
    "data.train_split": "Folder of the training files under `data.root`.",
    "data.validation_split": "Folder of the validation files under `data.root`.",
    "data.stats_file": "The statistics file; `null` = `data.root/stats.h5`.",
    "data.channels": "Channel indices to use (0 = TMQ … 15 = ZBOT); `null` = all 16. "
                     "`model.in_channels` follows.",
    "data.normalization": "`minmax` (`(x - min) / (max - min)`) or `zscore` "
                          "(`(x - mean) / std`), per channel, from the statistics file.",
    "data.crop": "Training crop `[height, width]` (multiples of 16) at a random, "
                 "seed-determined offset; `null` = the full field.",
    "data.validation_crop": "Centre crop `[height, width]` for validation; `null` = the "
                            "training crop (`data.crop`), so the full field when training on "
                            "full fields.",
    "data.validation_tile": "Run the validation field in half-overlapping tiles "
                            "`[height, width]`, their probabilities averaged, as `climseg "
                            "evaluate` and `predict` then do too; for a model trained on crops "
                            "and validated on larger fields (its image-pooling branch averages "
                            "over its whole input). `null` = in one piece.",
    "data.loader_threads": "Reader threads per rank.",
    "data.prefetch": "Batches read ahead per rank.",
    "data.shuffle": "Shuffle the training order every epoch (a seeded shuffle).",
    "data.max_validation_samples": "Score only the first N validation files (all ranks "
                                   "together); `null` = the whole split.",
    "model.name": "The model: DeepLabv3+ with the modified aligned Xception of the MLPerf "
                  "reference (56,454,720 parameters at 16 → 3 channels).",
    "model.in_channels": "Input channels; `null` = the number `data.channels` selects.",
    "model.num_classes": "Output classes.",
    "model.class_names": "Names in reports (TensorBoard `eval/iou_<name>`, the console); "
                         "`null` = `background`, `tropical_cyclone`, `atmospheric_river`, and "
                         "required when `model.num_classes` is not 3.",
    "model.width": "Channel multiplier of the backbone, ASPP and decoder (depth and output "
                   "stride stay); `1.0` = the reference's DeepLabv3+ (56.5M parameters, "
                   "the MLPerf closed division needs it). The test suite trains `0.25` "
                   "(3.6M): a step and a checkpoint cost a fraction.",
    "loss.class_frequencies": "Pixel frequencies of background, TC and AR in the real "
                              "training set (0.98627, 0.00046, 0.01327, from the MLPerf "
                              "reference), one per class.",
    "loss.weight_pow": "Class weight = frequency ** `loss.weight_pow`.",
    "optimizer.name": "`lamb`, `adam`, `adamw` or `sgd` (with momentum: the exact-comparison "
                      "tests use it, since its float noise stays at rounding level).",
    "optimizer.lr": "Base learning rate.",
    "optimizer.betas": "Adam-type momentum terms.",
    "optimizer.eps": "Adam-type epsilon (MLPerf requires 1e-6).",
    "optimizer.weight_decay": "Decoupled weight decay.",
    "optimizer.momentum": "SGD's momentum, in [0, 1).",
    "optimizer.max_grad_norm": "Global gradient-norm clip (LAMB inside its step, Adam/AdamW/SGD "
                               "before it); `0` disables.",
    "scheduler.type": "`constant`, `multistep` or `cosine` (MLPerf's `cosine_annealing`).",
    "scheduler.warmup_steps": "Linear warmup steps.",
    "scheduler.warmup_factor": "Warmup ends at `optimizer.lr` × this factor (≥ 1, as in "
                               "MLPerf).",
    "scheduler.milestones": "Multistep: the steps at which the rate is multiplied by "
                            "`scheduler.decay_rate`.",
    "scheduler.decay_rate": "Multistep decay factor, in (0, 1].",
    "scheduler.t_max": "Cosine: the period in steps (required for `cosine`).",
    "scheduler.eta_min": "Cosine: the lowest learning rate.",
    "train.local_batch_size": "Samples per rank per micro-batch.",
    "train.gradient_accumulation": "Micro-batches per optimizer step (Horovod's "
                                   "`backward_passes_per_step`).",
    "train.global_batch_size": "When set, ranks × `train.local_batch_size` × "
                               "`train.gradient_accumulation` must equal it, and the trainer "
                               "refuses to start otherwise, saying which numbers to change.",
    "train.max_epochs": "Epoch budget.",
    "train.max_steps": "Optimizer-step budget; `null` = `train.max_epochs` decides.",
    "train.target_iou": "Stop when `eval_accuracy` reaches it; `0` disables.",
    "train.validation_frequency": "Steps between validations (there is one at every epoch "
                                  "end too); `0` = epoch ends only.",
    "train.log_frequency": "Steps between progress lines and train scalars (the only host "
                           "syncs in the loop).",
    "train.save_frequency": "Steps between checkpoints; `0` = only at the end.",
    "train.keep_checkpoints": "Newest step checkpoints kept (`best.pt` is kept apart).",
    "train.save_interval_minutes": "Also write a checkpoint once this many minutes have passed "
                                   "since the last one (rank 0's clock, agreed through the stop "
                                   "vote, so one step late); `0` = off. With the default a run "
                                   "stopped by a kill loses at most half an hour.",
    "train.stall_timeout": "Seconds without a finished step (or validation batch, or "
                           "checkpoint) after which a rank ends itself with one line naming "
                           "what it waits in, exit status 2: a hung or cut-off peer would "
                           "otherwise hold the job until its time limit. Never less than 10x "
                           "the longest gap seen so far; `0` = off "
                           "([reliability.md](reliability.md)).",
    "train.save_best": "A validation whose mean IoU beats every earlier one writes a checkpoint "
                       "at once and points `best.pt` at it; `false`: `best.pt` only moves at the "
                       "save points (for timed benchmark runs).",
    "train.precision": "`auto` (bf16 on CUDA, fp32 on CPU), `fp32`, `bf16`, `fp16` "
                       "(GradScaler, the Horovod way).",
    "train.channels_last": "channels_last model and input; `null` = on for CUDA, off on CPU.",
    "train.compile": "`torch.compile` the model.",
    "train.batchnorm_group_size": "Ranks whose batch-norm statistics are reduced together: "
                                  "1 = plain batch norm, N = groups of N consecutive ranks, "
                                  "0 or `null` = all ranks (the MLPerf reference's "
                                  "`--batchnorm_group_size`; CPU and GPU) "
                                  "([training.md](training.md#batch-norm-groups)).",
    "train.gradient_compression": "`none` or `fp16` allreduce compression.",
    "train.deterministic": "Deterministic kernels (for exact resume checks).",
    "train.image_frequency": "Validations between TensorBoard maps; `0` = never.",
    "train.cpu_threads": "Torch threads per rank on CPU; `null` = cores / ranks on the node.",
    "train.elastic": "Survive lost ranks under Horovod's elastic launcher (`jobs/elastic.sh`); "
                     "needs `train.global_batch_size`, every file on every host and "
                     "`train.batchnorm_group_size` 1; the accumulation follows the rank count "
                     "([elastic.md](elastic.md)).",
    "train.elastic_commit_frequency": "Elastic: steps between commits (the in-memory copies "
                                      "of the state a lost rank rolls back to).",
}

PREAMBLE = f"""\
# Every config key

<!-- Generated by `{GENERATOR}` (`make docs`)
from climseg/config.py and the descriptions in climseg/config_doc.py: edit those, not this
page. -->

A run's config is one tree of typed sections, built once: the defaults below, then the YAML
file given with `--config`, then dotted overrides on the command line, each value parsed as
YAML (`optimizer.lr=0.002 data.crop=[96,144] train.max_steps=null`). The resolved config is
printed at start and saved as `OUTPUT_DIR/config.yaml`. An unknown key, a wrong type or an
impossible value stops the run at once with one line naming the key (exit status 2).
"""


def _is_section(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint)


def _type_name(hint: Any) -> str:
    """``int | None`` -> ``int or null``, ``list[float]`` -> ``list of float``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(hint) if a is not type(None)]
        nullable = type(None) in typing.get_args(hint)
        return " or ".join(names + (["null"] if nullable else []))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"list of {_type_name(item)}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(hint, str(hint))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()


def _yaml(value: Any) -> str:
    """A default as it would be written in a config file."""
    if value == "":
        return '""'
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text.removesuffix("\n...").removesuffix(" ...").strip()


def sections(cls: type = Config) -> list[str]:
    """The section names of ``cls`` ("" for its top-level keys), in field order."""
    hints = typing.get_type_hints(cls)
    return [""] + [f.name for f in dataclasses.fields(cls) if _is_section(hints[f.name])]


def config_keys(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, str, str]]:
    """Every leaf key of the dataclass tree ``cls``: (dotted key, type, default as YAML)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            yield from config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", _type_name(hints[f.name]), _yaml(_default(f))


def problems(cls: type = Config, descriptions: dict[str, str] = DESCRIPTIONS,
             section_lines: dict[str, str] = SECTIONS) -> list[str]:
    """What stops the page being generated: keys without a description, descriptions (or
    references inside them) of keys that do not exist; empty when all is well."""
    keys = [key for key, _, _ in config_keys(cls)]
    known, names = set(keys), sections(cls)
    found = [f"{key}: no description" for key in keys if not descriptions.get(key, "").strip()]
    found += [f"{name or '(top level)'}: section has no line in SECTIONS"
              for name in names if not section_lines.get(name, "").strip()]
    found += [f"{key}: described, but config.py has no such key"
              for key in descriptions if key not in known]
    found += [f"{name}: in SECTIONS, but config.py has no such section"
              for name in section_lines if name not in names]
    dotted = re.compile(rf"`((?:{'|'.join(n for n in names if n)})\.[A-Za-z_]+)`")
    for key, text in descriptions.items() if len(names) > 1 else ():
        found += [f"{key}: the description names `{ref}`, which config.py does not have"
                  for ref in dotted.findall(text) if ref not in known]
    return found


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render(cls: type = Config, descriptions: dict[str, str] = DESCRIPTIONS,
           section_lines: dict[str, str] = SECTIONS) -> str:
    """The Markdown of docs/config.md; a ValueError listing :func:`problems` if any."""
    found = problems(cls, descriptions, section_lines)
    if found:
        raise ValueError(f"{len(found)} problem(s) in climseg/config_doc.py: "
                         + "; ".join(found))
    rows: dict[str, list[str]] = {name: [] for name in sections(cls)}
    for key, type_name, default in config_keys(cls):
        section = key.rpartition(".")[0]
        rows[section].append(f"| `{key}` | {type_name} | `{default}` | "
                             f"{_cell(descriptions[key])} |")
    parts = [PREAMBLE]
    for name, lines in rows.items():
        parts.append(f"## {f'`{name}`' if name else 'Top level'}\n\n{section_lines[name]}\n\n"
                     "| key | type | default | meaning |\n| --- | --- | --- | --- |\n"
                     + "\n".join(lines) + "\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m climseg.config_doc",
        description="Write docs/config.md: every config key, its type, default and meaning.")
    parser.add_argument("--output", type=Path,
                        help="the file to write (atomically); default: stdout")
    args = parser.parse_args(argv)
    try:
        text = render()
    except ValueError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    if args.output is None:
        sys.stdout.write(text)
        return 0
    try:
        with atomic_path(args.output) as tmp:
            tmp.write_text(text)
    except OSError as err:
        print(f"{parser.prog}: error: {args.output}: {err.strerror}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

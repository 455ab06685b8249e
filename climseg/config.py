"""The run configuration: one dataclass tree, built once from YAML plus dotted overrides.

``load_config("yaml/demo.yaml", ["optimizer.lr=0.002", "data.root=/dev/shm/cam"])`` reads the
file over the defaults below, applies each override (its value parsed as YAML, so ``[96, 144]``
and ``null`` work), checks every key and type, and validates each section in its
``__post_init__``. Every mistake raises :class:`ConfigError` with a message naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from climseg.atomic import atomic_path
from climseg.data.format import (CLASS_NAMES, DEEPCAM_CLASS_FREQUENCIES, DEEPCAM_WEIGHT_POW,
                                 NUM_CHANNELS)


# Input sides must be multiples of the model's output stride (climseg.model.deeplab.OUTPUT_STRIDE,
# kept equal by a test: the model module needs torch, a config must not).
OUTPUT_STRIDE = 16

# Numeric precisions a run or an inference may ask for (auto: bf16 on CUDA, fp32 on CPU).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A bad configuration value; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


@dataclass
class DataConfig:
    root: str = ""                      # holds <split>/data-*.h5 and stats.h5
    train_split: str = "train"
    validation_split: str = "validation"
    stats_file: str | None = None        # default: <root>/stats.h5
    channels: list[int] | None = None    # channel indices to use; null = all 16
    normalization: str = "minmax"        # minmax | zscore
    crop: list[int] | None = None        # training crop [height, width] at a random offset; null = full field
    validation_crop: list[int] | None = None  # centre crop for validation; null = as data.crop
    validation_tile: list[int] | None = None  # validate in tiles of this size; null = one piece
    loader_threads: int = 4
    prefetch: int = 2
    shuffle: bool = True
    max_validation_samples: int | None = None  # per run, across ranks; null = the whole split

    def __post_init__(self):
        _choice(self.normalization, "data.normalization", ("minmax", "zscore"))
        if self.channels is not None:
            _require(len(self.channels) > 0, "data.channels", "must list at least one channel")
            _require(all(0 <= c < NUM_CHANNELS for c in self.channels), "data.channels",
                     f"indices must be in 0..{NUM_CHANNELS - 1}, got {self.channels}")
            _require(len(set(self.channels)) == len(self.channels), "data.channels",
                     f"has repeated indices: {self.channels}")
        for key in ("crop", "validation_crop", "validation_tile"):
            crop = getattr(self, key)
            if crop is not None:
                _require(len(crop) == 2, f"data.{key}", f"must be [height, width], got {crop}")
                _require(all(c > 0 and c % OUTPUT_STRIDE == 0 for c in crop), f"data.{key}",
                         f"both sides must be positive multiples of {OUTPUT_STRIDE} (the "
                         f"model's output stride), "
                         f"got {crop}")
        _require(self.loader_threads >= 1, "data.loader_threads", "must be at least 1")
        _require(self.prefetch >= 1, "data.prefetch", "must be at least 1")
        _require(self.max_validation_samples is None or self.max_validation_samples > 0,
                 "data.max_validation_samples", "must be positive or null")

    @property
    def stats_path(self) -> Path:
        return Path(self.stats_file) if self.stats_file else Path(self.root) / "stats.h5"


MODEL_NAMES = ("deeplabv3plus",)  # the names climseg.model.build_model knows


@dataclass
class ModelConfig:
    name: str = "deeplabv3plus"
    in_channels: int | None = None       # null: the number of channels data.channels selects
    num_classes: int = 3
    class_names: list[str] | None = None  # for reports; null: DeepCAM's three classes
    width: float = 1.0                   # channel multiplier; 1.0 = the reference's DeepLabv3+

    def __post_init__(self):
        _choice(self.name, "model.name", MODEL_NAMES)
        _require(self.in_channels is None or self.in_channels > 0, "model.in_channels",
                 "must be positive or null")
        _require(self.num_classes >= 2, "model.num_classes", "must be at least 2")
        _require(0 < self.width <= 4, "model.width", f"must be in (0, 4], got {self.width}")
        if self.class_names is None:
            _require(self.num_classes == len(CLASS_NAMES), "model.class_names",
                     f"must name the {self.num_classes} classes when model.num_classes is not "
                     f"{len(CLASS_NAMES)} (the default names are {', '.join(CLASS_NAMES)})")
            self.class_names = list(CLASS_NAMES)
        _require(len(self.class_names) == self.num_classes, "model.class_names",
                 f"has {len(self.class_names)} names for model.num_classes={self.num_classes}")
        _require(len(set(self.class_names)) == len(self.class_names) and all(self.class_names),
                 "model.class_names", f"must be distinct non-empty names, got {self.class_names}")

    def build_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``climseg.model.build_model`` (the names are for reports)."""
        return {"name": self.name, "in_channels": self.in_channels,
                "num_classes": self.num_classes, "width": self.width}


@dataclass
class LossConfig:
    class_frequencies: list[float] = field(default_factory=lambda: list(DEEPCAM_CLASS_FREQUENCIES))
    weight_pow: float = DEEPCAM_WEIGHT_POW

    def __post_init__(self):
        _require(all(0 < f <= 1 for f in self.class_frequencies), "loss.class_frequencies",
                 f"every frequency must be in (0, 1] (a share of the pixels), "
                 f"got {self.class_frequencies}")


@dataclass
class OptimizerConfig:
    name: str = "lamb"                   # lamb | adam | adamw | sgd
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0           # global gradient-norm clip; 0 disables
    momentum: float = 0.9                # sgd only (the others use betas)

    def __post_init__(self):
        _choice(self.name, "optimizer.name", ("lamb", "adam", "adamw", "sgd"))
        _require(self.lr > 0, "optimizer.lr", f"must be positive, got {self.lr}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas",
                 f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, "optimizer.eps", "must be positive")
        _require(self.weight_decay >= 0, "optimizer.weight_decay", "must be non-negative")
        _require(self.max_grad_norm >= 0, "optimizer.max_grad_norm", "must be non-negative")
        _require(0 <= self.momentum < 1, "optimizer.momentum",
                 f"must be in [0, 1), got {self.momentum}")


@dataclass
class SchedulerConfig:
    type: str = "constant"               # constant | multistep | cosine
    warmup_steps: int = 0
    warmup_factor: float = 1.0
    milestones: list[int] = field(default_factory=list)
    decay_rate: float = 0.1
    t_max: int | None = None
    eta_min: float = 0.0

    def __post_init__(self):
        _choice(self.type, "scheduler.type", ("constant", "multistep", "cosine"))
        _require(self.warmup_steps >= 0, "scheduler.warmup_steps", "must be non-negative")
        _require(self.warmup_factor >= 1.0, "scheduler.warmup_factor",
                 f"must be at least 1 (the MLPerf warmup multiplier), got {self.warmup_factor}")
        _require(list(self.milestones) == sorted(set(self.milestones))
                 and all(m >= 1 for m in self.milestones), "scheduler.milestones",
                 f"must be strictly increasing step numbers >= 1, got {self.milestones}")
        _require(self.eta_min >= 0, "scheduler.eta_min", f"must be non-negative, got {self.eta_min}")
        _require(0 < self.decay_rate <= 1, "scheduler.decay_rate", "must be in (0, 1]")
        if self.type == "cosine":
            _require(self.t_max is not None and self.t_max > 0, "scheduler.t_max",
                     "must be a positive number of steps for the cosine schedule")
        if self.type == "multistep":
            _require(len(self.milestones) > 0, "scheduler.milestones",
                     "must list at least one step for the multistep schedule")


@dataclass
class TrainConfig:
    local_batch_size: int = 1
    gradient_accumulation: int = 1       # micro-batches per optimizer step
    global_batch_size: int | None = None  # when set, ranks x local x accumulation must equal it
    max_epochs: int = 1
    max_steps: int | None = None         # optimizer steps; null = max_epochs decide
    target_iou: float = 0.82             # stop when eval_accuracy reaches it; 0 disables
    validation_frequency: int = 0        # steps between validations; 0 = only at epoch ends
    log_frequency: int = 10              # steps between progress lines and train scalars
    save_frequency: int = 0              # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3            # newest step checkpoints kept (best.pt is kept apart)
    save_interval_minutes: float = 30.0  # also a checkpoint once this long since the last; 0 = off
    save_best: bool = True               # a validation better than all before saves at once (best.pt)
    stall_timeout: float = 300.0         # seconds without a finished step before a rank ends itself; 0 = off
    precision: str = "auto"              # auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA, fp32 on CPU)
    channels_last: bool | None = None    # null: on for CUDA, off on CPU
    compile: bool = False                # torch.compile the model
    batchnorm_group_size: int | None = 1  # ranks sharing batch-norm statistics: 1 = none, N = groups of N, 0/null = all
    gradient_compression: str = "none"   # none | fp16 (Horovod allreduce compression)
    deterministic: bool = False          # deterministic kernels (for exact resume tests)
    image_frequency: int = 1             # validations between TensorBoard map images; 0 = never
    cpu_threads: int | None = None       # torch threads per rank on CPU; null = cores / ranks per node
    elastic: bool = False                # survive lost ranks under horovodrun --min-np/--max-np (docs/elastic.md)
    elastic_commit_frequency: int = 10   # steps between elastic commits (what a lost rank rolls back to)

    def __post_init__(self):
        for key in ("local_batch_size", "gradient_accumulation", "max_epochs", "log_frequency",
                    "keep_checkpoints", "elastic_commit_frequency"):
            _require(getattr(self, key) >= 1, f"train.{key}", "must be at least 1")
        for key in ("validation_frequency", "save_frequency", "image_frequency"):
            _require(getattr(self, key) >= 0, f"train.{key}", "must be 0 or positive")
        _require(self.batchnorm_group_size is None or self.batchnorm_group_size >= 0,
                 "train.batchnorm_group_size", "must be 0, null or positive")
        _require(self.cpu_threads is None or self.cpu_threads >= 1, "train.cpu_threads",
                 "must be positive or null")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps",
                 "must be positive or null")
        _require(self.global_batch_size is None or self.global_batch_size >= 1,
                 "train.global_batch_size", "must be positive or null")
        _require(0.0 <= self.target_iou <= 1.0, "train.target_iou", "must be in [0, 1]")
        _require(self.save_interval_minutes >= 0, "train.save_interval_minutes",
                 "must be 0 (off) or a positive number of minutes")
        _require(self.stall_timeout >= 0, "train.stall_timeout",
                 "must be 0 (off) or a positive number of seconds")
        _choice(self.precision, "train.precision", PRECISIONS)
        _choice(self.gradient_compression, "train.gradient_compression", ("none", "fp16"))
        if self.elastic:
            # The rank count changes during an elastic run: the global batch is what stays.
            _require(self.global_batch_size is not None, "train.global_batch_size",
                     "is required with train.elastic: the accumulation follows the rank count")
            _require(self.global_batch_size % self.local_batch_size == 0,
                     "train.global_batch_size", f"({self.global_batch_size}) must be a "
                     f"multiple of train.local_batch_size ({self.local_batch_size})")
            _require(self.batchnorm_group_size == 1, "train.batchnorm_group_size",
                     "must be 1 with train.elastic (rank groups cannot follow a change of ranks)")


# Engines behind climseg.dist (docs/engines.md); kept here so a config needs no torch import.
ENGINES = ("horovod", "torch")


@dataclass
class DistConfig:
    engine: str = "horovod"              # horovod (horovodrun, srun+MPI) | torch (torchrun, srun)

    def __post_init__(self):
        _choice(self.engine, "dist.engine", ENGINES)


@dataclass
class Config:
    output_dir: str = "runs/default"
    seed: int = 333
    resume: str = "none"                 # none | auto | path to a checkpoint
    overwrite: bool = False              # start over in an output_dir holding another run (moved aside)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        _require(not (self.train.elastic and self.dist.engine != "horovod"), "train.elastic",
                 f"is Horovod-only (horovodrun --min-np/--max-np); dist.engine="
                 f"{self.dist.engine} runs a fixed set of ranks: set train.elastic=false or "
                 "dist.engine=horovod")
        _require(bool(self.data.root), "data.root", "is required (e.g. data.root=/dev/shm/cam)")
        _require(bool(self.output_dir), "output_dir", "is required")
        _require(self.seed > 0, "seed", "must be positive (MLPerf requires it)")
        _require(not (self.overwrite and self.resume == "auto"), "overwrite",
                 "true starts over and resume=auto continues the run in output_dir: give one")
        n_channels = len(self.data.channels) if self.data.channels is not None else NUM_CHANNELS
        if self.model.in_channels is None:
            self.model.in_channels = n_channels
        _require(self.model.in_channels == n_channels, "model.in_channels",
                 f"is {self.model.in_channels} but data.channels selects {n_channels} channels")
        _require(len(self.loss.class_frequencies) == self.model.num_classes,
                 "loss.class_frequencies",
                 f"has {len(self.loss.class_frequencies)} values for {self.model.num_classes} classes")

    def elastic_accumulation(self, world_size: int) -> int:
        """Micro-batches per step that keep ``train.global_batch_size`` on ``world_size``
        ranks (elastic runs); a ConfigError when they cannot."""
        t = self.train
        per_step = world_size * t.local_batch_size
        _require(t.global_batch_size % per_step == 0, "train.global_batch_size",
                 f"({t.global_batch_size}) is not a multiple of {world_size} ranks x "
                 f"local_batch_size {t.local_batch_size}: with train.elastic every rank count "
                 "the job may shrink or grow to must divide it")
        return t.global_batch_size // per_step

    def global_batch(self, world_size: int) -> int:
        """Samples per optimizer step over all ranks; checks ``train.global_batch_size``."""
        t = self.train
        actual = world_size * t.local_batch_size * t.gradient_accumulation
        _require(t.global_batch_size is None or t.global_batch_size == actual,
                 "train.global_batch_size",
                 f"is {t.global_batch_size} but {world_size} ranks x local_batch_size "
                 f"{t.local_batch_size} x gradient_accumulation {t.gradient_accumulation} = "
                 f"{actual}; {_fitting(t.global_batch_size or 0, world_size, t.local_batch_size)}")
        return actual

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fitting(global_batch: int, ranks: int, local: int) -> str:
    """What would give ``global_batch`` on ``ranks`` ranks: the accumulation for this local
    batch, other local batches, or rank counts that would."""
    per_rank = global_batch // ranks if global_batch % ranks == 0 else 0
    if per_rank and per_rank % local == 0:
        return f"set train.gradient_accumulation={per_rank // local}"
    if per_rank:
        pairs = [f"{b} x {per_rank // b}" for b in range(1, per_rank + 1) if per_rank % b == 0]
        return ("on these ranks, local_batch_size x gradient_accumulation must be "
                f"{per_rank}: " + ", ".join(pairs[:6]))
    counts = [n for n in range(1, global_batch + 1)
              if global_batch % (n * local) == 0][:8]
    return (f"{global_batch} is not a multiple of {ranks} ranks; with local_batch_size {local} "
            f"it fits on " + (", ".join(map(str, counts)) + " ranks" if counts else "no count"))


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """``value`` converted to ``hint`` where that is lossless, else a ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(value, inner, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, tuple):
            value = list(value)
        _require(isinstance(value, list), key, f"must be a list, got {value!r}")
        return [_check_type(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        _require(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key,
                 f"must be an integer, got {value!r}")
        return value
    if hint is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key,
                 f"must be a number, got {value!r}")
        _require(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        _require(isinstance(value, (str, int, float)) and not isinstance(value, bool), key,
                 f"must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"config field {key} has an unsupported type {hint}")


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for name in values:
        if name not in known:
            hint = _did_you_mean(name, known, prefix)
            raise ConfigError(f"{prefix}{name}: unknown key ({hint + ' ' if hint else ''}known: "
                              f"{', '.join(sorted(known))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        key = f"{prefix}{f.name}"
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            section = values[f.name]
            _require(isinstance(section, dict), key, f"must be a mapping, got {section!r}")
            kwargs[f.name] = _build(hint, section, f"{key}.")
        else:
            kwargs[f.name] = _check_type(values[f.name], hint, key)
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. optimizer.lr=0.002")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {err}") from None
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


# Shipped configs (yaml/*.yaml beside the package) can be named without a path: `--config demo`.
BUILTIN_DIR = Path(__file__).resolve().parent.parent / "yaml"


def builtin_configs() -> list[str]:
    """Names of the shipped configs, for ``--config NAME``."""
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it exists, else a shipped config's file when ``path`` is a bare name
    (``demo``, ``ci``), so that a config is addressable from any folder."""
    path = Path(path)
    if path.exists():
        if path.is_dir():
            raise ConfigError(f"{path}: is a directory, not a config file (give a .yaml file, "
                              f"or one of the built-in configs: {', '.join(builtin_configs())})")
        return path
    if path.name == str(path) and not path.suffix:
        shipped = BUILTIN_DIR / f"{path.name}.yaml"
        if shipped.is_file():
            return shipped
    names = builtin_configs()
    hint = _did_you_mean(path.stem, names) or f"built-in configs: {', '.join(names)}"
    raise ConfigError(f"{path}: config file not found ({hint})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error: PyYAML keeps the
    last one silently, so a second ``train:`` section would drop the whole first one."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise ConfigError(f"{key_node.start_mark.name}: key {key!r} appears twice, on "
                                  f"lines {seen[key]} and {line}; keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


def _did_you_mean(word: str, choices, prefix: str = "") -> str:
    """``"did you mean PREFIXX?"`` for the closest of ``choices`` to a mistyped ``word``, or
    ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean {prefix}{close[0]}?" if close else ""


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file at ``path`` (a file, or a built-in config's name), then
    ``overrides``; validated."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the config file ({err})") from None
        try:
            loaded = yaml.load(text, Loader=_loader_for(path))
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        if loaded is None:
            raise ConfigError(f"{path}: the config file is empty; give at least data.root "
                              "(or leave out --config to run on the defaults)")
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        tree = loaded
    for override in overrides:
        _apply_override(tree, override)
    return _build(Config, tree, "")


def _loader_for(path: Path) -> type:
    """The duplicate-refusing loader, naming ``path`` in its messages."""
    class Loader(_UniqueKeyLoader):
        def __init__(self, stream):
            super().__init__(stream)
            self.name = str(path)
    return Loader


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    return _build(Config, values, "")

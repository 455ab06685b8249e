"""Load a trained checkpoint and run it: the shared core of ``evaluate`` and ``predict``.

A checkpoint (see docs/design.md, "Checkpoints") holds the unwrapped model's state dict and the
resolved config, so it loads the same whether it came from 1 or 1024 ranks, and on CPU or GPU:
tensors are mapped to the requested device and converted to the model's dtype on load. The
stored config is read back into the typed :class:`~climseg.config.Config` (validated, with the
defaults of this version for keys an older run did not write), never used as a raw dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from climseg.checkpoint import CheckpointError, load_checkpoint
from climseg.config import PRECISIONS, Config, ConfigError, config_from_dict
from climseg.data.format import CLASS_NAMES, FILE_GLOB, DataError, validate_file
from climseg.data.stats import channel_indices, normalization, read_stats
from climseg.engine import Precision
from climseg.grid import RegularGrid, grid_from_record, regular_grid
from climseg.model import build_model
from climseg.model.deeplab import OUTPUT_STRIDE  # input sides must be multiples of this
# Prefixes that wrappers add to parameter names: DistributedDataParallel and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_LIST_AT_MOST = 5

log = logging.getLogger("climseg.inference")


def select_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``name`` (cpu, cuda, cuda:N) or, when None, this rank's GPU if there is one, else cpu."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device: cuda requested but no GPU is visible")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    return device


def add_model_arguments(parser) -> None:
    """The options evaluate and predict share: normalization stats, device, precision."""
    parser.add_argument("--stats", default=None,
                        help="stats.h5 for normalization (default: the one named in the checkpoint)")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="autocast dtype (auto: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--full-field", action="store_true",
                        help="each field in one forward pass, not in tiles of the size the "
                             "run validated at (a crop-trained model then does worse: its "
                             "image-pooling branch averages over a larger input)")
    parser.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="run each field in half-overlapping HxW tiles instead (e.g. the "
                             "training crop, to compare with the run's own setting)")


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_AT_MOST])
    more = len(items) - _LIST_AT_MOST
    return f"{shown} and {more} more" if more > 0 else shown


def _strip_wrappers(state: dict[str, Any]) -> dict[str, Any]:
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_checkpoint(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[dict[str, Any], Config]:
    """The checkpoint dict at ``path`` with tensors on ``device``, and its run's config.

    CheckpointError if it is not a checkpoint or its config does not validate."""
    ckpt = load_checkpoint(path, map_location=device)
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: the checkpoint's config is not a mapping")
    try:
        cfg = config_from_dict(ckpt["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: the checkpoint's config does not validate: {err}") from None
    if not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path}: the checkpoint's 'model' entry is not a state dict")
    return ckpt, cfg


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every key that does not fit ``model`` (a few of each kind)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_listing(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({_listing(mismatched)})")
    if problems:
        raise CheckpointError(f"{source}: weights do not fit the model: " + "; ".join(problems))


def model_from_checkpoint(ckpt: dict[str, Any], cfg: Config, source: str,
                          device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model that a checkpoint dict and its config (from :func:`read_checkpoint`)
    describe, in eval mode."""
    m = cfg.model
    described = f"model {m.name}, {m.in_channels} -> {m.num_classes} channels"
    if m.width != 1:
        described += f", width {m.width:g}"
    try:
        model = build_model(**m.build_kwargs())
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot build the {described}: {err}") from None
    state = _strip_wrappers(dict(ckpt["model"]))
    check_state_dict(model, state, f"{source} ({described})")
    model.load_state_dict(state)  # copy_ converts bf16/fp16 weights to the model's dtype
    return model.to(device).eval()


def load_model(checkpoint_path: str | os.PathLike,
               device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config]:
    """The checkpoint's model in eval mode on ``device``, and its run's config."""
    ckpt, cfg = read_checkpoint(checkpoint_path, device)
    return model_from_checkpoint(ckpt, cfg, str(checkpoint_path), device), cfg


def model_grid(ckpt: dict[str, Any], cfg: Config, source: str) -> RegularGrid | None:
    """The latitude/longitude grid the checkpoint's model learned on: the one it records
    (:func:`climseg.grid.grid_record`); for a checkpoint written before climseg recorded it,
    the grid implied by the shape of its training data (``data.root``/``data.train_split``),
    when they are at hand; else None, and inputs are then taken on their own grids, as
    before. Either fallback is said in a log line."""
    record = ckpt.get("grid")
    if record is not None:
        try:
            return grid_from_record(record)
        except ValueError as err:
            raise CheckpointError(f"{source}: the checkpoint's grid: {err}") from None
    train_dir = Path(cfg.data.root) / cfg.data.train_split
    files = sorted(train_dir.glob(FILE_GLOB)) if train_dir.is_dir() else []
    try:
        shape = validate_file(files[0])[:2] if files else None
    except DataError:
        shape = None
    if shape is None:
        log.warning("%s records no grid (written before climseg did) and its training data "
                    "are not at %s: inputs are taken on their own grids, not regridded",
                    source, train_dir)
        return None
    log.info("%s records no grid (written before climseg did): taking the %dx%d grid its "
             "training data in %s imply", source, *shape, train_dir)
    return regular_grid(*shape)


def config_hash(cfg: Config) -> str:
    """sha256 of a run's config as climseg reads it back (JSON, keys sorted): equal for two
    checkpoints of the same settings, whatever their paths or file layout."""
    text = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def class_names(cfg: Config) -> tuple[str, ...]:
    """Names of the run's classes: ``model.class_names`` where the config has it, else the
    DeepCAM names for three classes, else ``class_0``, ``class_1``, ..."""
    names = getattr(cfg.model, "class_names", None)
    if names:
        return tuple(names)
    if cfg.model.num_classes == len(CLASS_NAMES):
        return CLASS_NAMES
    return tuple(f"class_{c}" for c in range(cfg.model.num_classes))


@dataclass(frozen=True)
class InputSpec:
    """How a checkpoint's model wants its input: which channels, normalized how, what size."""

    channels: list[int]        # indices into the file's NUM_CHANNELS channels, in model order
    shift: np.ndarray          # float32 (C,): x_normalized = (x - shift) * scale
    scale: np.ndarray          # float32 (C,)
    crop: tuple[int, int] | None  # the training crop (height, width); None = full field
    normalization: str
    stats_file: str


def input_spec(cfg: Config, stats_file: str | os.PathLike | None = None) -> InputSpec:
    """Channels, normalization and crop from ``cfg.data`` (a checkpoint's config).

    ``stats_file`` overrides the path stored in the checkpoint (for a checkpoint moved to
    another machine); the stored path, else ``<data.root>/stats.h5``, is the default.
    """
    data = cfg.data
    from_checkpoint = stats_file is None
    stats_file = os.fspath(data.stats_path if from_checkpoint else stats_file)
    if from_checkpoint and not os.path.exists(stats_file):
        raise DataError(f"{stats_file}: the stats file the model was trained with is not here; "
                        "pass the training data's stats.h5 with --stats")
    channels = channel_indices(data.channels)
    shift, scale = normalization(read_stats(stats_file), data.normalization, channels)
    return InputSpec(channels=channels,
                     shift=np.asarray(shift, dtype=np.float32).reshape(-1),
                     scale=np.asarray(scale, dtype=np.float32).reshape(-1),
                     crop=tuple(data.crop) if data.crop else None,
                     normalization=data.normalization, stats_file=stats_file)


def prepare(data: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """A file's (H, W, NUM_CHANNELS) sample as the model's input: (1, C, H, W), normalized, channels_last."""
    x = np.asarray(data, dtype=np.float32)[..., spec.channels]
    x = (x - spec.shift) * spec.scale
    return torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(0).permute(0, 3, 1, 2)


def run_field(cfg: Config) -> tuple[int, int] | None:
    """The input size a run validated at: its ``data.validation_tile``, else its
    ``data.validation_crop``, else its training ``data.crop``, else None (whole fields).
    evaluate and predict run a larger field in tiles of this size."""
    size = cfg.data.validation_tile or cfg.data.validation_crop or cfg.data.crop
    return tuple(int(s) for s in size) if size else None


def chosen_tile(cfg: Config, full_field: bool = False,
                tile: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The tile evaluate and predict run a field in: ``tile`` (``--tile H W``) when given, None
    (one piece) with ``full_field``, else the run's own (:func:`run_field`)."""
    if tile is None:
        return None if full_field else run_field(cfg)
    if full_field:
        raise ConfigError("--tile and --full-field: choose one (tiles, or the field in one piece)")
    if any(t <= 0 or t % OUTPUT_STRIDE for t in tile):
        raise ConfigError(f"--tile: sides must be positive multiples of {OUTPUT_STRIDE}, "
                          f"got {tile[0]} {tile[1]}")
    return int(tile[0]), int(tile[1])


def scored_region(full: tuple[int, int], crop: tuple[int, int] | None,
                  tile: tuple[int, int] | None) -> dict[str, Any]:
    """What a score or a mask covers, said in words (``region``) and in numbers: the scored
    ``field`` (the centred ``crop``, else the ``full_field``), its ``fraction`` of the full
    field, and the ``tile`` it was run in (None: in one piece)."""
    full = (int(full[0]), int(full[1]))
    h, w = (int(crop[0]), int(crop[1])) if crop is not None else full
    fraction = h * w / (full[0] * full[1])
    tile = tuple(int(t) for t in tile) if tile is not None and (
        tile[0] < h or tile[1] < w) else None
    if (h, w) == full:
        text = f"the whole {h}x{w} field"
    else:
        text = (f"only the centred {h}x{w} crop of the {full[0]}x{full[1]} field "
                f"({100 * fraction:.1f} % of it)")
    text += f", in {tile[0]}x{tile[1]} tiles" if tile else ", in one piece"
    return {"region": text, "field": [h, w], "full_field": list(full), "fraction": fraction,
            "tile": list(tile) if tile else None}


def _tile_starts(size: int, tile: int) -> list[int]:
    """Offsets of tiles of ``tile`` covering ``size`` with half-tile overlap (each pixel away
    from the border is scored in context, not only at a tile's edge); the last one ends at
    the edge."""
    step = max(tile // 2, 1)
    starts = list(range(0, size - tile + 1, step))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def tile_average(forward, x: torch.Tensor, tile: tuple[int, int] | None,
                 tiles_per_batch: int = 16) -> torch.Tensor:
    """``forward`` (a batch of inputs -> log-probabilities (n, K, h, w)) applied to ``x`` (N, C,
    H, W) in half-overlapping tiles of ``tile``; the log of the probabilities averaged where
    tiles overlap. One call on the whole input when ``tile`` is None or covers it.

    Averaged in log space (logaddexp, then minus log of the count): a probability too small for
    float32 (a confident miss, log p of -1000) keeps its loss instead of underflowing to 0.
    Stays on ``x``'s device."""
    h, w = x.shape[-2:]
    if tile is None or (tile[0] >= h and tile[1] >= w):
        return forward(x)
    th, tw = min(tile[0], h), min(tile[1], w)
    boxes = [(top, left) for top in _tile_starts(h, th) for left in _tile_starts(w, tw)]
    count = torch.zeros(1, 1, h, w, device=x.device)
    for t, l in boxes:
        count[..., t:t + th, l:l + tw] += 1
    total = None
    for n in range(x.shape[0]):
        for i in range(0, len(boxes), tiles_per_batch):
            chunk = boxes[i:i + tiles_per_batch]
            logp = forward(torch.stack([x[n, :, t:t + th, l:l + tw] for t, l in chunk]))
            if total is None:
                total = torch.full((x.shape[0], logp.shape[1], h, w), -torch.inf,
                                   device=x.device)
            for (t, l), lp in zip(chunk, logp):
                window = total[n, :, t:t + th, l:l + tw]
                window.copy_(torch.logaddexp(window, lp.float()))
    return total - count.log()


class TiledModel(torch.nn.Module):
    """``model`` run in tiles of ``tile`` (see :func:`tile_average`) behind the interface of a
    plain model, so the trainer's evaluation loop scores whole fields with it unchanged.

    ``forward`` returns the log of the averaged probabilities: their argmax is the tiled
    prediction, and cross-entropy on them is the loss of the averaged probabilities (the
    log-softmax of log-probabilities that sum to one is themselves)."""

    def __init__(self, model: torch.nn.Module, tile: tuple[int, int],
                 tiles_per_batch: int = 16):
        super().__init__()
        self.model, self.tile, self.tiles_per_batch = model, tuple(tile), tiles_per_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def log_probabilities(batch):
            return torch.log_softmax(self.model(batch).float(), dim=1)

        return tile_average(log_probabilities, x, self.tile, self.tiles_per_batch)


@torch.no_grad()
def predict_log_probabilities(model: torch.nn.Module, x: torch.Tensor, prec: Precision,
                              tile: tuple[int, int] | None = None, tiles_per_batch: int = 16
                              ) -> torch.Tensor:
    """Log class probabilities (N, K, H, W) float32 on ``prec.device`` for an input batch (N,
    C, H, W); see :func:`predict_probabilities`. In log space, so that a scored loss keeps
    the probabilities too small for float32."""
    def log_probabilities(batch):
        h, w = batch.shape[-2:]
        pad_h, pad_w = -h % OUTPUT_STRIDE, -w % OUTPUT_STRIDE
        if pad_w:
            batch = F.pad(batch, (0, pad_w, 0, 0), mode="circular")
        if pad_h:
            batch = F.pad(batch, (0, 0, 0, pad_h), mode="replicate")
        with prec.autocast():
            logits = model(prec.prepare(batch))
        return torch.log_softmax(logits[..., :h, :w].float(), dim=1)

    x = x.to(prec.device, non_blocking=True)
    return tile_average(log_probabilities, x, tile, tiles_per_batch)


def predict_probabilities(model: torch.nn.Module, x: torch.Tensor, prec: Precision,
                          tile: tuple[int, int] | None = None, tiles_per_batch: int = 16
                          ) -> torch.Tensor:
    """Class probabilities (N, K, H, W) float32 on the CPU for an input batch (N, C, H, W).

    The forward pass runs as the trainer's evaluation does (``prec``: device, autocast dtype,
    memory layout), so predictions match ``climseg.evaluate``'s. With ``tile`` (the run's
    validation size) smaller than the field, the field is covered by half-overlapping tiles
    of that size, scored in batches of ``tiles_per_batch``, and overlapping probabilities are
    averaged: a model trained on crops sees inputs of the size it learned on (its
    image-pooling branch averages over the whole input). Inputs whose sides are not
    multiples of the output stride are padded (periodically in longitude, by edge values in
    latitude) and the result cropped back.
    """
    return predict_log_probabilities(model, x, prec, tile, tiles_per_batch).exp().cpu()

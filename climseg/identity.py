"""What a resumed run must share with the run that wrote its checkpoint.

A checkpoint records the run's *identity*: the config keys that shape the model and its
optimizer state, and fingerprints of the data (:func:`data_fingerprint`). A resume compares
them with this run's (:func:`check_identity`) before it loads anything: another number of
classes or channels would fail deep in ``load_state_dict``, and another data set, statistics
file, normalization or optimizer would train on silently as if it were the same run.

The fingerprints do not depend on where the data lie: a copy restaged to another folder, or a
node-local staging folder after a requeue, has the same file names and the same statistics.
File sizes are left out: a staged split holds only its node's files (``index.txt`` lists the
rest), so rank 0 cannot see them all.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np

from climseg.data.format import NUM_CHANNELS
from climseg.errors import CheckpointError

log = logging.getLogger(__name__)

# Config keys a resumed run must keep: the model's shape (its input channels are
# data.channels'), the inputs it was trained on and the optimizer whose state it holds.
CONFIG_KEYS = ("model.name", "model.num_classes", "data.channels", "data.normalization",
               "optimizer.name")
# Fingerprints of the data (data_fingerprint), recorded since climseg 'identity' checkpoints.
DATA_KEYS = ("data.stats", "data.train_files", "data.validation_files")
# How to set a data key back, where "set KEY=VALUE" would not say it.
_DATA_FIX = ("point data.root (and data.stats_file) at the data set the run trained on; the "
             "same files under another path are fine")
# A short hash is enough to tell two data sets apart in a message; it is what is compared.
_HASH_CHARS = 16


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:_HASH_CHARS]


def data_fingerprint(stats, train_files: list, validation_files: list) -> dict[str, str]:
    """``data.stats``, ``data.train_files``, ``data.validation_files`` of a data set: a hash
    of the statistics' values (not of the file, nor its path) and of each split's sorted file
    names, with their count."""
    values = np.concatenate([np.asarray([stats.count], np.float64)]
                            + [np.asarray(getattr(stats, k), np.float64)
                               for k in ("mean", "sqmean", "minval", "maxval")])

    def names(files: list) -> str:
        listing = sorted(Path(f).name for f in files)
        return f"{len(listing)} files (sha256 {_short_hash(chr(10).join(listing).encode())})"

    return {"data.stats": f"sha256 {_short_hash(values.tobytes())}",
            "data.train_files": names(train_files),
            "data.validation_files": names(validation_files)}


def _lookup(config: dict[str, Any], key: str) -> Any:
    section, name = key.split(".")
    value = config.get(section, {}).get(name)
    if key == "data.channels" and value is None:
        return list(range(NUM_CHANNELS))  # null selects every channel
    return value


def run_identity(config: dict[str, Any], fingerprint: dict[str, str]) -> dict[str, Any]:
    """What a checkpoint of this run records: :data:`CONFIG_KEYS` from ``config`` (a
    ``Config.to_dict()``) and the data ``fingerprint``."""
    return {**{key: _lookup(config, key) for key in CONFIG_KEYS}, **fingerprint}


def check_identity(path: Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse (CheckpointError, one line) a checkpoint whose run differs from this one
    (``identity``, from :func:`run_identity`) in any key a resume must match. A checkpoint
    written before climseg recorded the data's fingerprints is checked on its config's keys,
    with a warning that the data could not be."""
    then = state.get("identity")
    if not then:
        then = run_identity(state["config"], {})
        log.warning("resume: %s was written before climseg recorded its data's fingerprints: "
                    "%s could not be checked (resuming)", path, ", ".join(DATA_KEYS))
    differ = [k for k in identity if k in then and then[k] != identity[k]]
    if not differ:
        return
    fixes = []
    for key in differ:
        fix = _DATA_FIX if key in DATA_KEYS else f"set {key}={then[key]}"
        if fix not in fixes:
            fixes.append(fix)
    if len(differ) == 1:
        (key,) = differ
        what = f"{key}={then[key]}, this run has {identity[key]}"
    else:
        what = (", ".join(f"{k}={then[k]}" for k in differ) + "; this run has "
                + ", ".join(f"{k}={identity[k]}" for k in differ))
    raise CheckpointError(
        f"resume: {path} was written with {what}: a resumed run must match; "
        + "; ".join(fixes) + ", or start over (resume=none overwrite=true moves the old run to "
        "a dated folder beside it, or another output_dir)")

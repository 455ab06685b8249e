"""ClimateNet netCDF4 files -> climseg samples: values and order, errors naming the file, --force,
and a converted set that passes the checker, summarizes and trains."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from climseg.data.check import check_tree
from climseg.data.climatenet import main, output_name, read_climatenet
from climseg.data.format import CHANNELS, read_sample
from climseg.data.split import split_dataset
from climseg.data.summarize import summarize_split
from climseg.data.synthetic import generate_sample

REPO = Path(__file__).resolve().parents[1]
H, W = 64, 96

# ClimateNet stores the variables in its own (alphabetical-ish) order, not climseg's.
NC_ORDER = sorted(CHANNELS)


def write_climatenet_file(path: Path, data: np.ndarray, labels: np.ndarray, *, drop=(),
                          reshape=None, lat_descending=False, labels_with_time=False) -> None:
    """A file laid out as ClimateNet's netCDF4 files are: dimension scales time/lat/lon, one
    (time=1, lat, lon) variable per channel, LABELS (lat, lon)."""
    with h5py.File(path, "w") as f:
        f.attrs["Conventions"] = "CF-1.0"
        time = f.create_dataset("time", data=np.array([0.0]))
        lat_values = np.linspace(-90, 90, data.shape[0])
        lat = f.create_dataset("lat", data=lat_values[::-1] if lat_descending else lat_values)
        lon = f.create_dataset("lon", data=np.linspace(0, 360, data.shape[1], endpoint=False))
        for name, scale in (("time", time), ("lat", lat), ("lon", lon)):
            scale.make_scale(name)
        for name in NC_ORDER:
            if name in drop:
                continue
            plane = data[..., CHANNELS.index(name)]
            if lat_descending:
                plane = plane[::-1]
            values = plane[None]
            if reshape and name in reshape:
                values = np.resize(values, reshape[name])
            var = f.create_dataset(name, data=values)
            var.attrs["units"] = "unknown"
            if values.ndim == 3:
                for axis, scale in enumerate((time, lat, lon)):
                    var.dims[axis].attach_scale(scale)
        lab = labels[::-1] if lat_descending else labels
        if "LABELS" not in drop:
            lab_var = f.create_dataset("LABELS", data=(lab[None] if labels_with_time else lab)
                                       .astype(np.int64))
            if not labels_with_time:
                lab_var.dims[0].attach_scale(lat)
                lab_var.dims[1].attach_scale(lon)


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(np.random.default_rng([21, i]), H, W) for i in range(12)]


@pytest.fixture(scope="module")
def climatenet_dir(samples, tmp_path_factory):
    folder = tmp_path_factory.mktemp("climatenet") / "train"
    folder.mkdir()
    for i, (data, labels) in enumerate(samples):
        write_climatenet_file(folder / f"data-2011-06-{i + 1:02d}-01-1_0.nc", data, labels)
    (folder / "README.txt").write_text("not a netCDF file: ignored")
    return folder


def run_tool(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "convert_climatenet.py"), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_converts_values_channel_order_and_labels(climatenet_dir, samples, tmp_path):
    out = tmp_path / "converted"
    assert main(["--data", str(climatenet_dir), "--output", str(out), "--quiet"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == [f"data-2011-06-{i + 1:02d}-01-1_0.h5" for i in range(12)]   # no temps
    for i, (data, labels) in enumerate(samples):
        got, got_labels = read_sample(out / written[i])
        np.testing.assert_array_equal(got, data)
        np.testing.assert_array_equal(got_labels, labels)


def test_north_to_south_file_is_flipped_and_labels_may_have_time(samples, tmp_path):
    data, labels = samples[0]
    path = tmp_path / "cn_descending.nc"
    write_climatenet_file(path, data, labels, lat_descending=True, labels_with_time=True)
    got, got_labels = read_climatenet(path)
    np.testing.assert_array_equal(got, data)
    np.testing.assert_array_equal(got_labels, labels)
    assert output_name(path) == "data-cn_descending.h5"


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop=("PSL",)), "missing variable 'PSL'"),
    (dict(drop=("LABELS",)), "missing variable 'LABELS'"),
    (dict(reshape={"U850": (2, H, W)}), r"variable 'U850' has shape \(2, 64, 96\), expected"),
    (dict(reshape={"Z200": (1, H, W + 1)}), r"variable 'Z200' has shape \(1, 64, 97\)"),
])
def test_bad_file_is_one_line_naming_it(samples, tmp_path, kwargs, message):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = folder / "data-2011-01-01-00-1_0.nc"
    write_climatenet_file(bad, *samples[0], **kwargs)
    result = run_tool("--input", str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith(f"climseg convert-climatenet: error: {bad}: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert not list((tmp_path / "out").glob("*.h5"))


def test_bad_labels_and_not_hdf5(samples, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    data, labels = samples[0]
    write_climatenet_file(folder / "a.nc", data, np.full_like(labels, 3))
    result = run_tool("--data", str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "'LABELS' has values outside {0..2}" in result.stderr
    (folder / "a.nc").write_bytes(b"CDF\x01 a netCDF3 classic file")
    result = run_tool("--data", str(folder), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "not a netCDF4/HDF5 file" in result.stderr
    assert "nccopy -k nc4" in result.stderr
    result = run_tool("--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "input folder not found" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_tool("--data", str(empty), "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "no *.nc files" in result.stderr


def test_refuses_existing_output_without_force(climatenet_dir, tmp_path):
    out = tmp_path / "out"
    result = run_tool("--data", str(climatenet_dir), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "converting ClimateNet files: 12/12" in result.stderr    # progress
    result = run_tool("--data", str(climatenet_dir), "--output", str(out))
    assert result.returncode == 2 and "already holds 12 data-*.h5 files; use --force" \
        in result.stderr
    (out / "data-old-sample.h5").write_bytes(b"stale")
    result = run_tool("--data", str(climatenet_dir), "--output", str(out), "--force", "--quiet")
    assert result.returncode == 0 and result.stderr == ""
    assert len(list(out.glob("data-*.h5"))) == 12


def test_converted_set_checks_summarizes_and_trains(climatenet_dir, tmp_path):
    from climseg import train as train_module
    from climseg.config import load_config

    converted = tmp_path / "converted"
    assert main(["--data", str(climatenet_dir), "--output", str(converted), "--quiet"]) == 0
    root = tmp_path / "root"
    counts = split_dataset(converted, root, fractions=(0.75, 0.25, 0.0))
    assert counts["train"] == 9 and counts["validation"] == 3
    summarize_split(root, "train", progress=False)
    checked, problems = check_tree(root, workers=1, progress=False)
    assert checked == 12 and problems == []
    out = tmp_path / "run"
    cfg = load_config(REPO / "yaml" / "ci.yaml",
                      [f"data.root={root}", f"output_dir={out}", "train.max_steps=2",
                       "train.validation_frequency=2", "data.max_validation_samples=1"])
    summary = train_module.train(cfg)
    assert summary["steps"] == 2 and 0.0 <= summary["eval_mean_iou"] <= 1.0

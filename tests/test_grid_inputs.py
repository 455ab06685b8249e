"""Grid-aware predict (issue 20, items 1 and 2): checkpoints record their grid; netCDF inputs
on CAM5-, ERA5- and MERRA-2-like grids are read, regridded to the model's grid and masked on
their own coordinates.

The regridder is checked against an analytic field and a derived error bound on the full-size
grids (cheap numpy); model runs use a tiny convolutional net on a coarse grid, with oracles
computed another way: the same data in climseg's layout, a field that bilinear interpolation
reproduces exactly, and the nearest cell found by arithmetic on the cell edges.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5netcdf
import h5py
import numpy as np
import pytest
import torch
from scipy.io import netcdf_file
from torch import nn

from climseg import config as config_module
from climseg import dist, evaluate, events, inference, predict
from climseg.checkpoint import CheckpointManager, Progress, load_checkpoint, save_checkpoint
from climseg.config import load_config
from climseg.data.format import CHANNELS, DATA_KEY, read_sample, write_sample
from climseg.data.partition import list_files
from climseg.engine import Precision
from climseg.grid import (axis_grid, describe, grid_from_record, grid_record, regular_grid,
                          same_grid)
from climseg.inputs import open_gridded, variable_map
from climseg.model import deeplab
from climseg.plan import plan_run
from climseg.regrid import Regridder

xr = pytest.importorskip("xarray")  # a test dependency (requirements.txt, "# tests")

# The model's channels in these tests, and the ERA5-style names they are stored under.
USED = ["TMQ", "U850", "V850", "PSL"]
ERA5_NAMES = {"TMQ": "tcwv", "U850": "u850", "V850": "v850", "PSL": "msl"}
ERA5_MAP = ",".join(f"{c}={n}" for c, n in ERA5_NAMES.items())
CI = Path(__file__).resolve().parent.parent / "yaml" / "ci.yaml"


class GridNet(nn.Module):
    """Two 3x3 convolutions: each pixel's class depends on its neighbourhood."""

    def __init__(self, in_channels: int = 16, num_classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.Tanh(),
                                  nn.Conv2d(8, num_classes, 3, padding=1))

    def forward(self, x):
        return self.body(x)


@pytest.fixture
def grid_net(monkeypatch):
    monkeypatch.setitem(deeplab.MODELS, "gridnet", GridNet)
    monkeypatch.setattr(config_module, "MODEL_NAMES", (*config_module.MODEL_NAMES, "gridnet"))


def make_checkpoint(path, root, shape, channels=None, record=True):
    """A GridNet checkpoint trained (nominally) on fields of ``shape``; with ``record`` it
    stores their grid as the trainer does, else it is an old checkpoint without one."""
    overrides = [f"data.root={root}", "model.name=gridnet"]
    if channels:
        overrides.append(f"data.channels={[CHANNELS.index(c) for c in channels]}")
    config = load_config(None, overrides).to_dict()
    torch.manual_seed(4)
    model = GridNet(len(channels) if channels else 16)
    with torch.no_grad():  # strong enough weights that the predicted class varies
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(6)
    state = {"model": model.state_dict(), "config": config, "step": 3}
    if record:
        state["grid"] = grid_record(regular_grid(*shape))
    save_checkpoint(state, path)
    return path


def write_netcdf(path, lat, lon, fields, *, names=("lat", "lon"), time=None, classic=False):
    """A netCDF file as the climate toolchain writes one: 1-D coordinates ``names`` with CF
    attributes, ``fields`` {name: (T, lat, lon) or (lat, lon)}, ``time`` (values, attrs)."""
    coords = [(names[0], np.asarray(lat), {"units": "degrees_north",
                                           "standard_name": "latitude"}),
              (names[1], np.asarray(lon), {"units": "degrees_east",
                                           "standard_name": "longitude"})]
    if time is not None:
        coords.insert(0, ("time", np.asarray(time[0]), time[1]))
    lead = ("time",) if time is not None else ()
    if classic:  # netCDF-3 64-bit offset, as CAM5 history files are
        with netcdf_file(path, "w", version=2) as f:
            for name, values, attrs in coords:
                f.createDimension(name, len(values))
                var = f.createVariable(name, values.dtype, (name,))
                var[:] = values
                for k, v in attrs.items():
                    setattr(var, k, v)
            for name, values in fields.items():
                dims = lead + names if values.ndim == 3 else names
                f.createVariable(name, np.float32, dims)[:] = values
        return path
    with h5netcdf.File(path, "w") as f:
        for name, values, attrs in coords:
            f.dimensions[name] = len(values)
            f.create_variable(name, (name,), data=values).attrs.update(attrs)
        for name, values in fields.items():
            dims = lead + names if values.ndim == 3 else names
            f.create_variable(name, dims, data=values.astype(np.float32))
    return path


def cam5_axes():
    """CAM5's finite-volume 768x1152: rows on both poles (spacing 180/767), 0..360 east."""
    return np.linspace(-90, 90, 768), np.arange(1152) * 0.3125


def era5_axes():
    """ERA5's 0.25°: north to south, poles included, -180..180."""
    return 90 - 0.25 * np.arange(721), -180 + 0.25 * np.arange(1440)


def merra2_axes():
    """MERRA-2's 0.5° x 0.625°: south to north, poles included, -180..180."""
    return -90 + 0.5 * np.arange(361), -180 + 0.625 * np.arange(576)


# -- the checkpoint's grid ---------------------------------------------------------------------
def test_a_grid_record_round_trips_to_the_grid():
    for shape in ((768, 1152), (64, 96)):
        g = regular_grid(*shape)
        back = grid_from_record(grid_record(g))
        np.testing.assert_allclose(back.lat, g.lat, atol=1e-12)
        np.testing.assert_allclose(back.lon, g.lon, atol=1e-12)
        np.testing.assert_allclose(back.lat_bounds, g.lat_bounds, atol=1e-12)
        np.testing.assert_allclose(back.lon_bounds, g.lon_bounds, atol=1e-12)
    assert grid_record(regular_grid(768, 1152)) == {"lat": [-90 + 90 / 768, 180 / 768, 768],
                                                    "lon": [0.15625, 0.3125, 1152]}
    with pytest.raises(ValueError, match="not"):
        grid_from_record({"lat": [0, 1]})


def test_the_trainer_records_the_full_fields_grid_in_checkpoints(tiny_root, tmp_path):
    # A crop-trained run (ci.yaml: 32x48 crops) records the 64x96 grid it cropped from; the
    # checkpoint is what CheckpointManager.save writes.
    from climseg.train import Trainer

    cfg = load_config(CI, [f"data.root={tiny_root}", f"output_dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        state = trainer.checkpoints.state_dict(trainer.progress)
    finally:
        trainer.close()
    assert cfg.data.crop == [32, 48]
    assert state["grid"] == {"lat": [-90 + 90 / 64, 180 / 64, 64], "lon": [1.875, 3.75, 96]}
    path = save_checkpoint(state, tmp_path / "c.pt")
    assert load_checkpoint(path)["grid"] == state["grid"]  # weights_only loads it


def test_a_checkpoint_without_a_grid_takes_its_training_datas_and_says_so(
        tiny_root, grid_net, tmp_path, caplog):
    old = make_checkpoint(tmp_path / "old.pt", tiny_root, (8, 8), record=False)
    ckpt, cfg = inference.read_checkpoint(old)
    with caplog.at_level(logging.INFO, "climseg.inference"):
        g = inference.model_grid(ckpt, cfg, str(old))
    assert same_grid(g, regular_grid(64, 96))  # tiny_root's fields
    assert "records no grid" in caplog.text and "64x96" in caplog.text
    recorded = make_checkpoint(tmp_path / "new.pt", tiny_root, (32, 48))
    assert same_grid(inference.model_grid(*inference.read_checkpoint(recorded), "x"),
                     regular_grid(32, 48))
    cfg.data.root = str(tmp_path / "gone")
    caplog.clear()
    assert inference.model_grid(ckpt, cfg, str(old)) is None
    assert "inputs are taken on their own grids" in caplog.text


# -- the reader and the regridder on the real grids --------------------------------------------
def analytic(lat, lon):
    """2 + sin φ + cos φ cos(λ - 30°): a linear function of the 3-D position, smooth on the
    sphere, single-valued at the poles."""
    phi, lam = np.radians(lat)[:, None], np.radians(lon)[None, :]
    return 2 + np.sin(phi) + np.cos(phi) * np.cos(lam - np.radians(30))


def bilinear_bound(source, target) -> float:
    """Bilinear interpolation's error bound for :func:`analytic`, in its units.

    On a cell of sides hφ, hλ (radians) tensor-product linear interpolation errs by at most
    hφ²/8 max|f_φφ| + hλ²/8 max|f_λλ|; here |f_φφ| = |sin φ + cos φ cos λ'| <= √2 and
    |f_λλ| <= 1. Between a centred-cell grid's outermost ring and the pole (a gap g), the pole
    takes the ring's mean 2 ± sin φ_ring instead of f(pole) = 2 ± 1 (the cosine term averages
    to 0 over a regular ring): the blend errs by at most that gap's interpolation error and
    1 - sin|φ_ring| more. Plus float32 rounding of values near 3."""
    h_lat = np.radians(np.diff(source.lat).max())
    ring = np.abs(source.lat[[0, -1]]).min()
    pole_gap = np.radians(90 - ring)
    h_lat = max(h_lat, pole_gap)
    h_lon = np.radians(np.diff(source.lon).max())
    pole_value = 1 - np.sin(np.radians(ring)) if ring < 90 else 0.0
    return h_lat ** 2 / 8 * np.sqrt(2) + h_lon ** 2 / 8 + pole_value + 1e-5


@pytest.mark.parametrize("axes, names, classic", [
    (cam5_axes, ("lat", "lon"), True), (era5_axes, ("latitude", "longitude"), False),
    (merra2_axes, ("lat", "lon"), False)], ids=["cam5", "era5", "merra2"])
def test_reader_and_regridder_match_an_analytic_field_to_the_bilinear_bound(
        tmp_path, axes, names, classic):
    lat, lon = axes()
    truth = analytic(lat, lon).astype(np.float32)
    path = write_netcdf(tmp_path / "f.nc", lat, lon, {"TMQ": truth}, names=names,
                        classic=classic)
    model = regular_grid(768, 1152)
    tmq = CHANNELS.index("TMQ")
    with open_gridded(path, variable_map(None), [tmq], describe(model)) as src:
        data = src.read_step(0)[..., tmq]
        assert src.steps == 1 and src.time is None
        # the layout: rows south to north, columns eastward from 0°E, and back exactly
        assert (np.diff(src.grid.lat) > 0).all() and (np.diff(src.grid.lon) > 0).all()
        assert 0 <= src.grid.lon[0] < 360 / len(lon)
        np.testing.assert_array_equal(src.to_file_layout(data), truth)
        np.testing.assert_allclose(data, analytic(src.grid.lat, src.grid.lon), atol=1e-6)
        for target in (model, regular_grid(64, 96)):
            to = Regridder(src.grid, target)
            err = np.abs(to.bilinear(data) - analytic(target.lat, target.lon)).max()
            assert err <= bilinear_bound(src.grid, target), (describe(target), err)
            # back to the file's grid, poles included: from centred cells, with the pole rule
            back = Regridder(target, src.grid)
            field = analytic(target.lat, target.lon).astype(np.float32)
            err = np.abs(back.bilinear(field) - analytic(src.grid.lat, src.grid.lon)).max()
            assert err <= bilinear_bound(target, src.grid), (describe(target), err)
        # the bound tells bilinear from nearest neighbour, which errs by half a cell's slope
        nearest = Regridder(src.grid, model).nearest(data)
        assert np.abs(nearest - analytic(model.lat, model.lon)).max() > 10 * bilinear_bound(
            src.grid, model)


def test_the_seam_and_the_poles():
    # A 4x4 centred grid to targets on the seam and the poles: exact values by hand.
    src = regular_grid(4, 4)  # lat ±22.5, ±67.5; lon 45, 135, 225, 315
    field = np.arange(16, dtype=np.float64).reshape(4, 4)
    target = axis_grid(np.array([-90.0, -67.5, 90.0]), np.array([0.0, 45.0, 350.0]))
    out = Regridder(src, target).bilinear(field)
    south_pole, north_pole = field[0].mean(), field[3].mean()
    np.testing.assert_allclose(out[0], south_pole)  # one value at the pole, whatever the lon
    np.testing.assert_allclose(out[2], north_pole)
    # 0°E lies half-way between 315° (column 3) and 45°+360° (column 0); 350° is 35/90 of the
    # way from 315° on
    np.testing.assert_allclose(out[1], [(field[0, 3] + field[0, 0]) / 2, field[0, 0],
                                        field[0, 3] + 35 / 90 * (field[0, 0] - field[0, 3])])
    mask = np.arange(16).reshape(4, 4)
    assert Regridder(src, target).nearest(mask).tolist() == [[3, 0, 3], [3, 0, 3], [15, 12, 15]]


# -- predict on netCDF inputs -------------------------------------------------------------------
def test_a_file_on_the_models_grid_stored_otherwise_gets_exactly_the_samples_masks(
        tiny_root, grid_net, tmp_path):
    # The two test samples as one ERA5-style file: latitude north to south, longitude
    # -180..180, a time axis of 2 steps, ERA5 names. Read back into climseg's layout they
    # are the samples bit for bit, so the masks must be the HDF5 inputs' own, mapped back.
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (64, 96))
    files = list_files(tiny_root / "test")
    samples = [read_sample(f)[0] for f in files]
    g = regular_grid(64, 96)
    lon = np.where(g.lon > 180, g.lon - 360, g.lon)
    order = np.argsort(lon)                      # file column j holds climseg column order[j]
    assert order.tolist() == [*range(48, 96), *range(48)]
    fields = {ERA5_NAMES.get(c, c): np.stack([s[::-1][:, order, k] for s in samples])
              for k, c in enumerate(CHANNELS)}
    nc = write_netcdf(tmp_path / "era5.nc", g.lat[::-1], lon[order], fields,
                      names=("latitude", "longitude"),
                      time=(np.array([0, 3], np.int32), {"units": "hours since 2100-01-04",
                                                         "calendar": "standard"}))
    out_h5, out_nc = tmp_path / "h5", tmp_path / "nc"
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(out_h5), "--probabilities",
                         "--quiet", *map(str, files)]) == 0
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(out_nc), "--probabilities",
                         "--quiet", "--variables", ERA5_MAP, str(nc)]) == 0
    with xr.open_dataset(out_nc / "era5-mask.nc") as ds:
        ds.load()
    assert ds["class_mask"].dims == ("time", "latitude", "longitude")
    assert ds["probability"].dims == ("time", "class", "latitude", "longitude")
    for t, f in enumerate(files):
        with h5py.File(out_h5 / f"{f.stem}-mask.h5", "r") as h:
            mask = h[predict.PREDICTION_KEY][...]
            probs = h[predict.PROBABILITIES_KEY][...].astype(np.float32)
        np.testing.assert_array_equal(ds["class_mask"].values[t], mask[::-1][:, order])
        np.testing.assert_allclose(ds["probability"].values[t],
                                   np.moveaxis(probs, -1, 0)[:, ::-1][:, :, order], atol=1e-3)
        assert len(np.unique(mask)) >= 2, "a constant mask would make this test weak"
    assert "the model's own grid" in ds.attrs["grid"]
    assert [p.name for p in sorted(out_nc.iterdir())] == ["era5-mask.nc", "era5-t0.png",
                                                          "era5-t1.png"]


def _linear_fields(lat, lon, steps):
    """TMQ linear in latitude (bilinear interpolation reproduces it exactly away from the
    poles), the other channels constant per step: on any grid, the model's input is known."""
    def one(t, k):
        base = np.broadcast_to(np.float32(5 + 3 * k - 4 * t), (len(lat), len(lon)))
        return (30 + 0.2 * lat[:, None] + 0 * lon[None, :] - 5 * t if k == 0 else base)

    return {k: np.stack([one(t, k) for t in range(steps)]).astype(np.float32)
            for k in range(len(USED))}


def _expected(job_shape, lat, lon, steps, ckpt):
    """The mask on the input's grid by another route: the model run on the field computed on
    its own grid, then each input point given the class of the model cell it lies in (a
    point on an edge taking the southern / western cell, as the regridder's tie rule)."""
    model, cfg = inference.load_model(ckpt)
    spec = inference.input_spec(cfg)
    g = regular_grid(*job_shape)
    prec = Precision.build(torch.device("cpu"), "fp32", False)
    rows = np.clip(np.ceil((lat + 90) / (180 / job_shape[0])).astype(int) - 1, 0,
                   job_shape[0] - 1)
    cols = (np.ceil(np.mod(lon, 360) / (360 / job_shape[1])).astype(int) - 1) % job_shape[1]
    masks = []
    for t in range(steps):
        data = np.zeros((*job_shape, 16), np.float32)
        for k, values in _linear_fields(g.lat, g.lon, steps).items():
            data[..., CHANNELS.index(USED[k])] = values[t]
        probs = inference.predict_probabilities(model, inference.prepare(data, spec), prec)[0]
        masks.append(probs.argmax(0).numpy()[np.ix_(rows, cols)])
    return np.stack(masks)


@pytest.mark.parametrize("axes, names, classic, steps", [
    (cam5_axes, ("lat", "lon"), True, 1), (era5_axes, ("latitude", "longitude"), False, 2),
    (merra2_axes, ("lat", "lon"), False, 1)], ids=["cam5", "era5", "merra2"])
def test_a_file_on_another_grid_is_regridded_and_masked_on_its_own_coordinates(
        tiny_root, grid_net, tmp_path, axes, names, classic, steps):
    lat, lon = axes()
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (32, 48), channels=USED)
    era5 = names[0] == "latitude"
    fields = {(ERA5_NAMES[USED[k]] if era5 else USED[k]): v
              for k, v in _linear_fields(lat, lon, steps).items()}
    units = ("hours since 1900-01-01 00:00:00", "standard") if era5 else \
        ("days since 2000-01-01 00:00:00", "noleap")  # CAM5's calendar: opened undecoded
    time = (np.arange(steps, dtype=np.float64) * 6 + 100,
            {"units": units[0], "calendar": units[1], "standard_name": "time"})
    nc = write_netcdf(tmp_path / "in.nc", lat, lon, fields, names=names, time=time,
                      classic=classic)
    out = tmp_path / "out"
    args = ["--checkpoint", str(ckpt), "--output", str(out), "--probabilities", "--quiet"]
    assert predict.main(args + (["--variables", ERA5_MAP] if era5 else []) + [str(nc)]) == 0
    decode = units[1] == "standard"
    with xr.open_dataset(nc, decode_times=decode) as src, \
            xr.open_dataset(out / "in-mask.nc", decode_times=decode) as ds:
        ds.load()
        for name in (*names, "time"):
            np.testing.assert_array_equal(ds[name].values, src[name].values)
        assert ds["time"].attrs.get("calendar", ds["time"].encoding.get("calendar")) == units[1]
    mask = ds["class_mask"].values
    assert mask.shape == (steps, len(lat), len(lon))
    expected = _expected((32, 48), lat, lon, steps, ckpt)
    np.testing.assert_array_equal(mask, expected)
    assert len(np.unique(mask)) >= 2, "a constant mask would make this test weak"
    probs = ds["probability"].values
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)  # bilinear keeps the sum
    assert "regridded bilinearly" in ds.attrs["grid"] and "32x48" in ds.attrs["grid"]


# -- one-line errors ------------------------------------------------------------------------------
def _small(tmp_path, lat, lon, fields=None, name="x.nc"):
    fields = fields if fields is not None else {c: np.ones((len(lat), len(lon)), np.float32)
                                                for c in USED}
    return write_netcdf(tmp_path / name, lat, lon, fields)


def _one_line_error(capsys, args, command=predict) -> str:
    assert command.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    name = command.__name__.rsplit(".", 1)[-1]
    assert len(err) == 1 and err[0].startswith(f"climseg {name}: error: "), err
    return err[0]


def test_missing_variables_name_the_file_and_each_variable(tiny_root, grid_net, tmp_path,
                                                           capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (16, 24), channels=USED)
    g = regular_grid(16, 24)
    nc = _small(tmp_path, g.lat, g.lon, {"tcwv": np.ones((16, 24), np.float32),
                                         "U850": np.ones((16, 24), np.float32)})
    line = _one_line_error(capsys, ["--checkpoint", str(ckpt), "--output", str(tmp_path / "o"),
                                    "--variables", "TMQ=tcwv", str(nc)])
    assert str(nc) in line
    assert "missing variables the model needs: V850 (as 'V850'), PSL (as 'PSL')" in line
    # channels the model was not trained on may be absent: TMQ, U850, V850, PSL suffice
    ok = _small(tmp_path, g.lat, g.lon, name="ok.nc")
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "o"),
                         "--quiet", str(ok)]) == 0


def test_grids_it_cannot_handle_are_one_line_naming_the_file_and_the_models_grid(
        tiny_root, grid_net, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (16, 24), channels=USED)
    model = describe(regular_grid(16, 24))
    args = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "o")]
    g = regular_grid(16, 24)
    # 2-D (curvilinear) coordinates
    two_d = tmp_path / "curvilinear.nc"
    with h5netcdf.File(two_d, "w") as f:
        f.dimensions.update({"y": 16, "x": 24})
        f.create_variable("lat", ("y", "x"), data=np.repeat(g.lat[:, None], 24, 1))
        f.create_variable("lon", ("y", "x"), data=np.repeat(g.lon[None, :], 16, 0))
        for c in USED:
            f.create_variable(c, ("y", "x"), data=np.ones((16, 24), np.float32))
    line = _one_line_error(capsys, args + [str(two_d)])
    assert str(two_d) in line and "'lat' is 2-D (16, 24)" in line and model in line
    # irregular latitudes (a Gaussian-like grid)
    lat = np.sin(np.linspace(-1.45, 1.45, 16)) * 90
    irregular = _small(tmp_path, lat, g.lon, name="irregular.nc")
    line = _one_line_error(capsys, args + [str(irregular)])
    assert str(irregular) in line and "'lat' is not regularly spaced" in line and model in line
    # longitudes not monotonic
    lon = np.concatenate([g.lon[12:], g.lon[:12] + 0.5])
    shuffled = _small(tmp_path, g.lat, lon, name="shuffled.nc")
    line = _one_line_error(capsys, args + [str(shuffled)])
    assert str(shuffled) in line and "'lon' is not monotonic" in line and model in line
    # a regional grid
    regional = _small(tmp_path, g.lat[4:12], g.lon, name="regional.nc")
    line = _one_line_error(capsys, args + [str(regional)])
    assert str(regional) in line and "does not cover the globe" in line and model in line


def test_bad_variable_maps_and_formats_are_one_line(tiny_root, grid_net, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (16, 24), channels=USED)
    g = regular_grid(16, 24)
    nc = _small(tmp_path, g.lat, g.lon)
    args = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "o")]
    line = _one_line_error(capsys, args + ["--variables", "TMQ", str(nc)])
    assert "--variables: 'TMQ' is not CHANNEL=NAME" in line
    line = _one_line_error(capsys, args + ["--variables", "IVT=ivt", str(nc)])
    assert "--variables: 'IVT' is not a climseg channel" in line
    line = _one_line_error(capsys, args + ["--format", "hdf5", str(nc)])
    assert str(nc) in line and "--format hdf5" in line


def test_a_sample_file_of_another_shape_is_regridded_too(tiny_root, grid_net, tmp_path):
    # climseg's own HDF5 samples have the grid their shape implies: a 64x96 sample through a
    # model of the 32x48 grid is predicted there and its mask brought back to 64x96.
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (32, 48))
    f = list_files(tiny_root / "test")[0]
    out = tmp_path / "o"
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(out), "--quiet",
                         str(f)]) == 0
    with h5py.File(out / f"{f.stem}-mask.h5", "r") as h:
        assert h[predict.PREDICTION_KEY].shape == (64, 96)
        assert "regridded bilinearly" in h["climate"].attrs["grid"]
        assert h["climate"].attrs["region"] == "the whole 32x48 field, in one piece"
    with h5py.File(f, "r") as h:
        assert h[DATA_KEY].shape[:2] == (64, 96)


def test_the_manager_writes_the_grid_it_is_given(tiny_root):
    cfg = load_config(None, [f"data.root={tiny_root}"])
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(plan_run(cfg, 1), model=model, optimizer=opt,
                                scheduler=torch.optim.lr_scheduler.ConstantLR(opt), scaler=None)
    assert manager.state_dict(Progress())["grid"] is None
    manager.grid = grid_record(regular_grid(768, 1152))
    assert manager.state_dict(Progress())["grid"]["lon"] == [0.15625, 0.3125, 1152]


# -- evaluate on netCDF inputs --------------------------------------------------------------------
def _confusion(truth: np.ndarray, prediction: np.ndarray, k: int = 3) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (truth.ravel().astype(np.int64), prediction.ravel().astype(np.int64)), 1)
    return cm


def _smooth(lat, lon, rng) -> np.ndarray:
    """A smooth random field on the sphere, of order 1: a few low waves."""
    phi, lam = np.radians(lat)[:, None], np.radians(lon)[None, :]
    return sum(rng.normal() * np.cos(m * lam + rng.uniform(0, 2 * np.pi)) * np.cos(phi) ** m
               * np.cos(n * phi + rng.uniform(0, 2 * np.pi)) for m, n in ((1, 1), (2, 3), (3, 2)))


def _waves(ckpt, lat, lon, steps, seed=5):
    """Fields the model of ``ckpt`` reads as smooth waves of order 1 once normalized (its
    predicted class varies; raw tiny samples saturate it), per channel it uses (T, lat, lon),
    and labels drawn from the waves by thresholds, all three classes, independent of it."""
    spec = inference.input_spec(inference.read_checkpoint(ckpt)[1])
    rng = np.random.default_rng(seed)
    waves = [np.stack([_smooth(lat, lon, rng) for _ in range(steps)]) for _ in spec.channels]
    fields = {CHANNELS[c]: (spec.shift[k] + waves[k] / spec.scale[k]).astype(np.float32)
              for k, c in enumerate(spec.channels)}
    return fields, np.where(waves[0] > 0.7, 1, np.where(waves[-1] > 0.7, 2, 0)).astype(np.uint8)


def _same_samples_twice(ckpt, tmp_path) -> tuple[Path, Path]:
    """Two samples on the 64x96 grid as climseg's HDF5 split (ROOT/test) and as a folder of
    ClimateNet-style files, one per sample: every channel (1, lat, lon) under its own name,
    ``LABELS`` (lat, lon), rows north to south (climseg's run south to north)."""
    g = regular_grid(64, 96)
    fields, labels = _waves(ckpt, g.lat, g.lon, steps=2)
    root, folder = tmp_path / "root", tmp_path / "nc"
    (root / "test").mkdir(parents=True)
    folder.mkdir()
    for t in range(2):
        name = f"data-2100-01-0{t + 1}-00-1"
        write_sample(root / "test" / f"{name}.h5",
                     np.stack([fields[c][t] for c in CHANNELS], -1), labels[t])
        write_netcdf(folder / f"{name}.nc", g.lat[::-1], g.lon,
                     {**{c: v[t:t + 1, ::-1] for c, v in fields.items()},
                      "LABELS": labels[t, ::-1].astype(np.float32)},
                     time=(np.array([0.0]), {"units": "days since 2100-01-01",
                                             "calendar": "noleap"}))
    return root, folder


def test_evaluate_on_netcdf_files_on_the_models_grid_scores_as_on_the_hdf5_split(
        tiny_root, grid_net, tmp_path, capsys):
    # The same two samples, as climseg's HDF5 split and as ClimateNet-style netCDF files
    # stored north to south: the same pixels, labels and events, so the same scores.
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (64, 96))
    root, folder = _same_samples_twice(ckpt, tmp_path)
    split = evaluate.score(ckpt, root, batch_size=1)
    out = tmp_path / "nc.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(folder), "--batch-size",
                          "1", "--quiet", "--output", str(out)]) == 0
    gridded = json.loads(out.read_text())
    assert gridded["confusion"] == split["confusion"]
    assert gridded["events"] == split["events"]
    assert gridded["eval_accuracy"] == pytest.approx(split["eval_accuracy"])
    assert gridded["samples"] == split["samples"] == 2 and gridded["files"] == 2
    assert gridded["data"] == f"2 netCDF files in {folder}"
    cm = np.array(split["confusion"])
    assert (cm.sum(0) > 0).all() and (cm.sum(1) > 0).all(), "a weak test"
    assert sum(e["true"] for e in split["events"].values()) > 0
    assert gridded["regridded"] is False and "model's own grid, 64x96" in gridded["grid"]
    assert gridded["grid"].startswith("scored on the input's grid against its labels")
    assert "grid: scored on the input's grid" in capsys.readouterr().out
    assert "grid" not in split and split["region"] == "the whole 64x96 field, in one piece"


def test_each_rank_scores_its_netcdf_files_and_the_counts_are_summed(
        tiny_root, grid_net, tmp_path, monkeypatch):
    # As test_evaluate_predict's two-rank test: rank r of 2 scores files[r::2], and the
    # evaluation's two allreduces (pixel and event counts) sum them to the one-rank result.
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (64, 96))
    _, folder = _same_samples_twice(ckpt, tmp_path)
    single = evaluate.score(ckpt, sorted(folder.glob("*.nc")), batch_size=1)  # --data A B
    sent = {}
    monkeypatch.setattr(dist, "size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "allreduce_sum", lambda t, name: sent.setdefault(name, t.clone()))
    assert evaluate.score(ckpt, folder, batch_size=1)["samples"] == 1
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "allreduce_sum", lambda t, name: t + sent[name])
    rank0 = evaluate.score(ckpt, folder, batch_size=1)
    assert sorted(sent) == ["eval_counts", "event_counts"]
    assert rank0["confusion"] == single["confusion"] and rank0["events"] == single["events"]
    assert rank0["samples"] == 2


def test_evaluate_on_an_era5_like_grid_scores_predicts_masks_against_the_files_labels(
        tiny_root, grid_net, tmp_path, capsys):
    # A 3-degree ERA5-like file (north to south, poles included, -180..180, ERA5 names, two
    # time steps, labels named "labels") through a model of the 32x48 grid. The oracle:
    # predict's netCDF masks of the same file against its labels, counted with numpy, in
    # the file's own layout; events on it matched independently.
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (32, 48), channels=USED)
    lat, lon = 90 - 3.0 * np.arange(61), -180 + 3.0 * np.arange(120)
    fields, labels = _waves(ckpt, lat, lon, steps=2)
    nc = write_netcdf(tmp_path / "era5.nc", lat, lon,
                      {**{ERA5_NAMES[c]: v for c, v in fields.items()},
                       "labels": labels.astype(np.float32)},
                      names=("latitude", "longitude"),
                      time=(np.array([0, 6], np.int32), {"units": "hours since 2020-01-01",
                                                         "calendar": "standard"}))
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "p"),
                         "--quiet", "--variables", ERA5_MAP, str(nc)]) == 0
    with xr.open_dataset(tmp_path / "p" / "era5-mask.nc") as ds:
        masks = ds["class_mask"].values
    out = tmp_path / "era5.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(nc), "--variables",
                          ERA5_MAP, "--batch-size", "2", "--quiet", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["confusion"] == _confusion(labels, masks).tolist()
    assert result["samples"] == 2 and result["batches"] == 1
    assert sum(map(sum, result["confusion"])) == 2 * 61 * 120
    names = tuple(result["classes"])
    totals = {n: {"true": 0, "predicted": 0, "matched": 0} for n in names[1:]}
    for t in range(2):
        for n, c in events.event_scores(masks[t], labels[t], names).items():
            totals[n] = {k: totals[n][k] + c[k] for k in c}
    assert {n: {k: e[k] for k in totals[n]} for n, e in result["events"].items()} == totals
    assert len(np.unique(masks)) >= 2 and len(np.unique(labels)) == 3, "a weak test"
    assert result["regridded"] is True and result["field"] == [32, 48]
    assert "61x120" in result["grid"] and "regridded bilinearly" in result["grid"]
    assert "nearest neighbour" in result["grid"]
    assert result["region"] == ("each input's whole field, on its own grid; the model ran on "
                                "the whole 32x48 field, in one piece")
    assert "grid: scored on the input's grid against its labels" in capsys.readouterr().out


def test_evaluate_on_an_hdf5_split_of_another_shape_scores_predicts_masks(
        tiny_root, grid_net, tmp_path, capsys):
    # climseg's HDF5 samples on the 64x96 grid their shape implies, through a model of the
    # 32x48 grid: evaluate regrids as predict does (not the model run at 64x96, which a fully
    # convolutional net would also accept). The oracle: predict's HDF5 masks of the same files
    # against their labels, counted with numpy.
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (32, 48))
    g = regular_grid(64, 96)
    fields, labels = _waves(ckpt, g.lat, g.lon, steps=3)
    root = tmp_path / "root"
    (root / "test").mkdir(parents=True)
    files = [root / "test" / f"data-2100-01-0{t + 1}-00-1.h5" for t in range(3)]
    for t, path in enumerate(files):
        write_sample(path, np.stack([fields[c][t] for c in CHANNELS], -1), labels[t])
    assert predict.main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "p"),
                         "--quiet", *map(str, files)]) == 0
    masks = []
    for path in files:
        with h5py.File(tmp_path / "p" / f"{path.stem}-mask.h5", "r") as h:
            masks.append(h[predict.PREDICTION_KEY][...])
    out = tmp_path / "split.json"
    assert evaluate.main(["--checkpoint", str(ckpt), "--data", str(root), "--batch-size", "2",
                          "--quiet", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["confusion"] == _confusion(labels, np.stack(masks)).tolist()
    assert result["samples"] == 3 and result["batches"] == 2
    assert len(np.unique(masks)) >= 2 and len(np.unique(labels)) == 3, "a weak test"
    assert result["regridded"] is True and result["field"] == [32, 48]
    assert "64x96" in result["grid"] and "regridded bilinearly" in result["grid"]
    assert result["region"] == ("the whole field, on the split's own grid; the model ran on "
                                "the whole 32x48 field, in one piece")
    assert "grid: scored on the split's grid against its labels" in capsys.readouterr().out
    # A centred crop belongs to the model's grid: asked on this split, one line, exit 2.
    line = _one_line_error(capsys, ["--checkpoint", str(ckpt), "--data", str(root), "--crop",
                                    "32", "48"], command=evaluate)
    assert str(root / "test") in line and "64x96 fields" in line and "32x48" in line


def test_evaluate_errors_on_netcdf_inputs_are_one_line(tiny_root, grid_net, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "m.pt", tiny_root, (16, 24), channels=USED)
    g = regular_grid(16, 24)
    plane = np.zeros((16, 24), np.float32)
    args = ["--checkpoint", str(ckpt), "--data"]

    def error(path, *more):
        return _one_line_error(capsys, args + [str(path), *more], evaluate)

    unlabelled = _small(tmp_path, g.lat, g.lon, name="unlabelled.nc")
    line = error(unlabelled)
    assert str(unlabelled) in line and "no label variable (looked for LABELS or labels)" in line
    assert "(looked for mask)" in error(unlabelled, "--labels", "mask")
    partial = _small(tmp_path, g.lat, g.lon, {"TMQ": plane, "U850": plane, "LABELS": plane},
                     name="partial.nc")
    line = error(partial)
    assert str(partial) in line
    assert "missing variables the model needs: V850 (as 'V850'), PSL (as 'PSL')" in line
    # labels on another grid than the fields'
    other = _small(tmp_path, g.lat, g.lon, name="other.nc")
    with h5netcdf.File(other, "a") as f:
        f.dimensions.update({"y": 8, "x": 12})
        f.create_variable("LABELS", ("y", "x"), data=np.zeros((8, 12), np.int8))
    line = error(other)
    assert str(other) in line and "labels 'LABELS' have dimensions ('y', 'x') of shape " \
        "(8, 12); the fields' are ('lat', 'lon') of shape (16, 24)" in line
    # one mask for two time steps
    steps = {c: np.zeros((2, 16, 24), np.float32) for c in USED}
    untimed = write_netcdf(tmp_path / "untimed.nc", g.lat, g.lon, {**steps, "LABELS": plane},
                           time=(np.array([0, 1]), {"units": "hours since 2000-01-01"}))
    line = error(untimed)
    assert str(untimed) in line and "have no time axis, but the fields have 2 time steps" in line
    # a grid it cannot handle: named, with the model's
    regional = _small(tmp_path, g.lat[4:12], g.lon,
                      {c: np.zeros((8, 24), np.float32) for c in [*USED, "LABELS"]},
                      name="regional.nc")
    line = error(regional)
    assert str(regional) in line and "does not cover the globe" in line
    assert "8x24 (lat" in line and describe(g) in line
    labelled = _small(tmp_path, g.lat, g.lon, {c: plane for c in [*USED, "LABELS"]},
                      name="labelled.nc")
    assert "--crop: netCDF inputs are scored whole" in error(labelled, "--crop", "16", "16")
    sample = list_files(tiny_root / "test")[0]
    assert f"{sample}: not a netCDF file" in error(labelled, str(sample))

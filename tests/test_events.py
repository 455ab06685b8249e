"""climseg events: connected events on hand-made masks whose answers are known."""

from __future__ import annotations

import csv
import math

import h5py
import numpy as np
import pytest

from climseg import events, grid
from climseg.data.format import CHANNELS, NUM_CHANNELS, write_sample
from climseg.netcdf import write_mask_netcdf
from climseg.predict import write_mask

NAMES = ("background", "tropical_cyclone", "atmospheric_river")
R = grid.EARTH_RADIUS_KM


def _rows(mask, tmq=None):
    fields = None if tmq is None else {"TMQ": tmq}
    return events.event_rows(mask, grid.regular_grid(*mask.shape), fields, NAMES)


def test_an_event_across_the_seam_counts_once_and_is_centred_on_it():
    mask = np.zeros((18, 36), np.uint8)   # 10-degree cells
    mask[5:8, 34:] = 2                    # 340-360°E
    mask[5:8, :2] = 2                     # 0-20°E: the same river
    mask[12, 10] = 1                      # a cyclone elsewhere
    rows = _rows(mask)
    assert [r["class"] for r in rows] == ["tropical_cyclone", "atmospheric_river"]
    river = rows[1]
    assert river["cells"] == 12
    assert (river["lon_west"], river["lon_east"]) == (345.0, 15.0)   # crosses 0°E
    assert min(river["centroid_lon"], 360 - river["centroid_lon"]) == pytest.approx(0, abs=1e-9)
    assert (river["lat_south"], river["lat_north"]) == (-35.0, -15.0)


def test_cells_touching_diagonally_across_the_seam_are_one_event():
    mask = np.zeros((18, 36), np.uint8)
    mask[5, 35] = mask[6, 0] = mask[7, 1] = 1
    mask[10, 35] = mask[10, 33] = 1           # two cells with a gap: two events
    rows = _rows(mask)
    assert sorted(r["cells"] for r in rows) == [1, 1, 3]


def test_a_crop_is_not_joined_across_its_edges_and_its_events_are_counted():
    mask = np.zeros((18, 36), bool)
    mask[5:8, 34:] = mask[5:8, :2] = True     # one event on the globe, two on a crop
    mask[12, 10] = True
    _, globe = events.label_events(mask)
    labels, crop = events.label_events(mask, periodic=False)
    assert (globe, crop) == (2, 3)
    assert sorted(np.bincount(labels.ravel())[1:]) == [1, 6, 6]
    truth = mask.astype(np.uint8)
    scores = events.event_scores(truth, truth, NAMES, periodic=False)
    assert scores["tropical_cyclone"] == {"true": 3, "predicted": 3, "matched": 3}


def test_area_of_a_box_is_the_spherical_zone_formula():
    # A box from 10°S to 30°N and 40° of longitude on a 1-degree grid: the difference of two
    # spherical caps, 2πR²(1 − sin φ), times the box's share of a full circle.
    mask = np.zeros((180, 360), np.uint8)
    mask[80:120, 100:140] = 1
    (row,) = _rows(mask)

    def cap(lat):
        return 2 * math.pi * R ** 2 * (1 - math.sin(math.radians(lat)))

    assert row["area_km2"] == pytest.approx((cap(-10) - cap(30)) * 40 / 360, rel=1e-12)
    whole = grid.cell_areas_km2(grid.regular_grid(768, 1152)).sum() * 1152
    assert whole == pytest.approx(4 * math.pi * R ** 2, rel=1e-12)


def test_centroid_latitude_is_area_weighted():
    # one cell at the equator and one at 60°: the equator's is twice as large (cos 60° = 1/2)
    mask = np.zeros((180, 360), np.uint8)
    mask[90, 0] = mask[150, 0] = 1
    mask[91:150, 0] = 1                     # joined by a column of cells
    (row,) = _rows(mask)
    lat = grid.regular_grid(180, 360).lat[90:151]
    w = np.cos(np.radians(lat))
    assert row["centroid_lat"] == pytest.approx((w * lat).sum() / w.sum(), rel=1e-4)


def test_the_cli_writes_one_row_per_event_from_sample_hdf5_and_netcdf_files(tmp_path,
                                                                            capsys):
    labels = np.zeros((18, 36), np.uint8)
    labels[5:8, 34:] = labels[5:8, :2] = 2
    labels[12, 10] = 1
    data = np.zeros((18, 36, NUM_CHANNELS), np.float32)
    data[..., CHANNELS.index("TMQ")] = 20.0
    data[6, 0, CHANNELS.index("TMQ")] = 61.5    # the river's wettest cell
    sample = tmp_path / "data-2100-03-01-06-1.h5"
    write_sample(sample, data, labels)
    h5_mask, nc_mask = tmp_path / "data-2100-03-01-06-1-mask.h5", tmp_path / "other-mask.nc"
    write_mask(h5_mask, labels, None, {"source": str(sample)})
    write_mask_netcdf(nc_mask, labels, None, {}, NAMES)        # no source: no TMQ, no time
    out = tmp_path / "events.csv"
    assert events.main(["--output", str(out), str(sample), str(h5_mask), str(nc_mask)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0]) == list(events.COLUMNS)
    assert [r["class"] for r in rows[:2]] == ["tropical_cyclone", "atmospheric_river"]
    assert rows[1]["max_tmq"] == rows[3]["max_tmq"] == "61.5" and rows[5]["max_tmq"] == ""
    assert rows[0]["time"] == rows[2]["time"] == "2100-03-01T18:00:00"   # step 06: 18:00
    assert rows[4]["time"] == ""
    for key in ("area_km2", "centroid_lat", "lon_west", "lon_east"):
        assert rows[1][key] == rows[3][key] == rows[5][key]


@pytest.mark.parametrize("content", [b"not hdf5", None])
def test_a_file_without_a_mask_is_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "bad.h5"
    if content is None:
        with h5py.File(path, "w") as f:
            f["other"] = np.zeros(3)
    else:
        path.write_bytes(content)
    assert events.main(["--output", str(tmp_path / "t.csv"), str(path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"climseg events: error: {path}: ")
    assert not (tmp_path / "t.csv").exists()


def _field_sample(tmp_path, name="data-2100-07-02-00-1.h5"):
    """A sample whose storms' statistics are known: a cyclone at rows 10-11, cols 5-6 and a
    river at rows 3-4, cols 20-29 on an 18x36 (10-degree) grid."""
    labels = np.zeros((18, 36), np.uint8)
    labels[10:12, 5:7] = 1
    labels[3:5, 20:30] = 2
    data = np.zeros((18, 36, NUM_CHANNELS), np.float32)
    ch = {name: CHANNELS.index(name) for name in events.FIELDS}
    rng = np.random.default_rng(0)
    for key in ("TMQ", "U850", "V850", "UBOT", "VBOT"):
        data[..., ch[key]] = rng.uniform(1, 30, (18, 36))
    data[..., ch["PSL"]] = rng.uniform(95000, 102000, (18, 36))
    path = tmp_path / name
    write_sample(path, data, labels)
    return path, data, labels, ch


def test_field_statistics_of_each_event_from_the_sample(tmp_path):
    path, data, labels, ch = _field_sample(tmp_path)
    rows = events.file_events(path)
    assert [r["class"] for r in rows] == ["tropical_cyclone", "atmospheric_river"]
    g = grid.regular_grid(18, 36)
    area = np.broadcast_to(grid.cell_areas_km2(g), labels.shape)
    for row, (rs, cs) in zip(rows, [(slice(10, 12), slice(5, 7)), (slice(3, 5), slice(20, 30))]):
        d = data[rs, cs]
        # IVT computed here as sqrt(u^2 + v^2) * TMQ, double precision
        ivt = d[..., ch["TMQ"]].astype(float) * np.sqrt(
            d[..., ch["U850"]].astype(float) ** 2 + d[..., ch["V850"]].astype(float) ** 2)
        w = area[rs, cs]
        assert row["max_tmq"] == float(d[..., ch["TMQ"]].max())
        assert row["mean_ivt"] == pytest.approx((w * ivt).sum() / w.sum(), rel=1e-6)
        assert row["max_ivt"] == pytest.approx(ivt.max(), rel=1e-6)
    cyclone, river = rows
    d = data[10:12, 5:7]
    assert cyclone["min_psl"] == float(d[..., ch["PSL"]].min())
    wind = np.sqrt(d[..., ch["UBOT"]].astype(float) ** 2 + d[..., ch["VBOT"]].astype(float) ** 2)
    assert cyclone["max_wind"] == pytest.approx(wind.max(), rel=1e-6)
    assert river["min_psl"] is None and river["max_wind"] is None   # cyclone statistics only


def test_summary_counts_events_by_centroid_band_and_month():
    def row(cls, lat, time):
        return {"class": cls, "centroid_lat": lat, "time": time}

    rows = [row("tropical_cyclone", 14.9, "2100-08-01T00:00:00"),
            row("tropical_cyclone", 15.0, "2100-08-03T00:00:00"),   # a band holds its south edge
            row("tropical_cyclone", -20.0, "2100-01-05T00:00:00"),
            row("atmospheric_river", 0.0, ""),                       # no time: "unknown"
            row("atmospheric_river", 89.9, "2100-08-01T00:00:00")]
    s = events.summarize(rows)
    assert s["latitude"]["tropical_cyclone"] == {
        "90S-60S": 0, "60S-30S": 0, "30S-15S": 1, "15S-0": 0, "0-15N": 1, "15N-30N": 1,
        "30N-60N": 0, "60N-90N": 0}
    assert s["latitude"]["atmospheric_river"]["0-15N"] == 1
    assert s["latitude"]["atmospheric_river"]["60N-90N"] == 1
    assert s["month"] == {"tropical_cyclone": {"01": 1, "08": 2},
                          "atmospheric_river": {"08": 1, "unknown": 1}}
    text = events.summary_text(s)
    assert text.splitlines()[0].split() == ["events", "by", "latitude", "band",
                                            "tropical_cyclone", "atmospheric_river"]
    assert "0-15N" in text and "unknown" in text


def test_event_scores_match_each_event_once_at_the_overlap_threshold():
    truth = np.zeros((20, 40), np.uint8)
    pred = np.zeros_like(truth)
    truth[2:6, 2:6] = 1        # 16 cells; predicted with 8 of them: IoU 8/16 = 0.5
    pred[2:6, 2:4] = 1
    truth[10:14, 10:14] = 1    # 16 cells; predicted by 1 cell: IoU 1/16 < 0.1
    pred[10, 10] = 1
    pred[16, 30] = 1           # a false alarm
    truth[2:4, 20:22] = 2      # two true rivers, one predicted river covering both:
    truth[6:8, 20:22] = 2      # it may match one of them only
    pred[2:8, 20:22] = 2
    scores = events.event_scores(pred, truth, NAMES, overlap=0.1)
    assert scores == {"tropical_cyclone": {"true": 2, "predicted": 3, "matched": 1},
                      "atmospheric_river": {"true": 2, "predicted": 1, "matched": 1}}
    assert events.event_scores(pred, truth, NAMES, overlap=0.05)["tropical_cyclone"][
        "matched"] == 2     # 1/16 = 0.0625 clears a lower bar
    skill = events.detection_skill(scores)
    assert skill["tropical_cyclone"] == pytest.approx(
        {"precision": 1 / 3, "recall": 1 / 2, "f1": 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)})
    assert events.detection_skill({"x": {"true": 0, "predicted": 0, "matched": 0}})["x"] == {
        "precision": None, "recall": None, "f1": None}


def test_the_cli_prints_the_summary_and_draws_the_plot(tmp_path, capsys):
    import matplotlib.image

    path, *_ = _field_sample(tmp_path)
    out, png = tmp_path / "events.csv", tmp_path / "events.png"
    assert events.main(["--output", str(out), "--plot", str(png), str(path)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(events.COLUMNS) and len(rows) == 2
    assert rows[1]["min_psl"] == "" and rows[0]["min_psl"] != ""
    printed = capsys.readouterr().out
    assert "events by latitude band" in printed and "events by month" in printed
    image = matplotlib.image.imread(png)
    assert image.shape[:2] == (480, 1280)
    # the cyclone's red (#d62728, drawn at alpha 0.55 on white) is somewhere on the map
    red = (image[..., 0] > 0.85) & (image[..., 1] < 0.6) & (image[..., 2] < 0.6)
    assert red.sum() > 20


def test_min_area_leaves_out_the_small_events(tmp_path, capsys, caplog):
    # _field_sample's cyclone covers 10-30 N x 20 degrees of longitude, its river 60-40 S x 100
    # degrees: areas from the spherical zone formula, R^2 dlon (sin north - sin south).
    path, *_ = _field_sample(tmp_path)
    zone = {"tropical_cyclone": math.radians(20) * (math.sin(math.radians(30)) -
                                                    math.sin(math.radians(10))),
            "atmospheric_river": math.radians(100) * (math.sin(math.radians(-40)) -
                                                      math.sin(math.radians(-60)))}
    between = R * R * (zone["tropical_cyclone"] + zone["atmospheric_river"]) / 2
    out = tmp_path / "events.csv"
    caplog.set_level("INFO", logger="climseg.events")
    assert events.main(["--output", str(out), "--min-area", str(between), str(path)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["atmospheric_river"]
    assert float(rows[0]["area_km2"]) == pytest.approx(R * R * zone["atmospheric_river"])
    assert "left out 1 of 2 events under" in caplog.text
    assert "tropical_cyclone" not in capsys.readouterr().out   # nor in the summary
    # an event of exactly the minimum area stays
    rows = _rows(_field_sample(tmp_path, "b.h5")[2])
    smallest = min(r["area_km2"] for r in rows)
    assert events.large_events(rows, smallest) == rows
    assert len(events.large_events(rows, np.nextafter(smallest, np.inf))) == 1


@pytest.mark.parametrize("value", ["-1", "x", "inf"])
def test_a_bad_min_area_is_one_line(tmp_path, capsys, value):
    path, *_ = _field_sample(tmp_path)
    with pytest.raises(SystemExit) as stop:
        events.main(["--output", str(tmp_path / "t.csv"), "--min-area", value, str(path)])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("climseg events: error: argument --min-area: must be an area in km²")
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_under_horovodrun_write_the_one_process_table(tmp_path, horovod):
    import os
    import subprocess
    import sys
    from pathlib import Path

    files = [_field_sample(tmp_path, f"data-2100-0{m}-02-00-1.h5")[0] for m in range(1, 6)]
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert events.main(["--quiet", "--output", str(one), *map(str, files)]) == 0
    horovodrun = Path(sys.executable).parent / "horovodrun"
    cmd = [str(horovodrun), "-np", "2", "-H", "localhost:2", "--gloo", sys.executable, "-m",
           "climseg.events", "--output", str(two), *map(str, files)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert two.read_bytes() == one.read_bytes()   # five files over two ranks, input order kept
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    # the sixth file is rank 1's (file i is rank i % 2's); rank 0 prints its line
    proc = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2
    assert f"climseg events: error: rank 1: {bad}: " in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not two.with_name("two.csv.tmp").exists()

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
    return events.event_rows(mask, grid.regular_grid(*mask.shape), tmq, NAMES)


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

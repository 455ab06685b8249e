"""The map: PNG of the expected pixel size, the TensorBoard array, a crop at its true
latitude/longitude extent, and input checks."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from climseg.plot import (CAM5_SHAPE, DPI, PANEL_SIZE, GridWindow, centre_window,
                          figure_to_array, plot_sample, save_map)

H, W = 48, 72


def png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


def fields():
    lat = np.linspace(-90, 90, H)[:, None]
    lon = np.linspace(0, 360, W, endpoint=False)[None, :]
    tmq = (50 * np.exp(-(lat / 30) ** 2) + 0 * lon).astype(np.float32)
    truth = np.zeros((H, W), np.uint8)
    truth[20:24, 10:14] = 1
    truth[30:33, 30:50] = 2
    pred = np.roll(truth, 3, axis=1)
    return tmq, pred, truth


def expected_pixels(panels: int) -> tuple[int, int]:
    return round(PANEL_SIZE[0] * panels * DPI), round(PANEL_SIZE[1] * DPI)


def test_truth_and_prediction_side_by_side_png(tmp_path):
    tmq, pred, truth = fields()
    path = tmp_path / "map.png"
    save_map(plot_sample(tmq, pred, truth, title="sample"), path)
    assert path.stat().st_size > 10_000
    assert png_size(path) == expected_pixels(2)
    assert [p.name for p in tmp_path.iterdir()] == ["map.png"]  # no temp file left behind


def test_prediction_only_is_one_panel(tmp_path):
    tmq, pred, _ = fields()
    path = tmp_path / "pred.png"
    save_map(plot_sample(tmq, prediction=pred), path)
    assert png_size(path) == expected_pixels(1)


def test_figure_to_array_is_hwc_uint8_and_shows_the_masks():
    tmq, pred, truth = fields()
    rgb = figure_to_array(plot_sample(torch.from_numpy(tmq), torch.from_numpy(pred),
                                      torch.from_numpy(truth)))
    width, height = expected_pixels(2)
    assert rgb.shape == (height, width, 3) and rgb.dtype == np.uint8
    plain = figure_to_array(plot_sample(tmq, np.zeros_like(pred), np.zeros_like(truth)))
    assert not np.array_equal(rgb, plain)


def test_mask_shape_mismatch_is_a_clear_error():
    tmq, pred, _ = fields()
    with pytest.raises(ValueError, match="prediction has shape"):
        plot_sample(tmq, prediction=pred[:, :10])


def test_whole_field_spans_the_globe():
    tmq, pred, truth = fields()
    fig = plot_sample(tmq, pred, truth)
    for ax in fig.axes[:2]:
        assert ax.get_xlim() == (0.0, 360.0) and ax.get_ylim() == (-90.0, 90.0)
        assert ax.images[0].get_extent() == [0.0, 360.0, -90.0, 90.0]
    assert list(fig.axes[0].get_xticks()) == [0, 60, 120, 180, 240, 300, 360]


def test_centre_crop_is_drawn_at_its_true_extent():
    # The demo's 96x144 validation crop of a real 768x1152 field: rows 336..431 and columns
    # 504..647, i.e. 11.25°S..11.25°N and 157.5°E..202.5°E at 0.234375° x 0.3125° per cell.
    window = centre_window(CAM5_SHAPE, (96, 144))
    assert (window.top, window.left) == (336, 504)
    rng = np.random.default_rng(0)
    tmq = rng.uniform(0, 60, (96, 144)).astype(np.float32)
    truth = np.zeros((96, 144), np.uint8)
    truth[40:50, 60:80] = 1
    fig = plot_sample(tmq, truth, truth, window=window)
    ax = fig.axes[0]
    west, east = ax.get_xlim()
    south, north = ax.get_ylim()
    assert (west, east, south, north) == pytest.approx((157.5, 202.5, -11.25, 11.25))
    assert ax.images[0].get_extent() == pytest.approx([157.5, 202.5, -11.25, 11.25])
    assert list(ax.get_yticks()) == [-10, -5, 0, 5, 10]
    assert list(ax.get_xticks()) == [160, 170, 180, 190, 200]
    # the cyclone's outline lies over its cells: rows 40..49 -> -1.875..0.469°N
    contour_lats = np.concatenate([p.vertices[:, 1] for c in ax.collections
                                   for p in c.get_paths() if len(p.vertices)])
    assert contour_lats.min() >= -11.25 + 39 * 0.234375
    assert contour_lats.max() <= -11.25 + 51 * 0.234375


def test_window_offsets_scale_with_the_full_grid():
    # A 48x72 crop at row 96, column 0 of a 192x288 synthetic field: cells are 0.9375° x 1.25°.
    tmq, _, _ = fields()
    ax = plot_sample(tmq, window=GridWindow(96, 0, (192, 288))).axes[0]
    assert ax.get_xlim() == pytest.approx((0.0, 90.0))
    assert ax.get_ylim() == pytest.approx((0.0, 45.0))


def test_window_outside_the_grid_is_a_clear_error():
    tmq, _, _ = fields()
    with pytest.raises(ValueError, match="does not fit the full 64x72 grid"):
        plot_sample(tmq, window=GridWindow(20, 0, (64, 72)))


def test_map_title_carries_the_date_and_time_of_the_sample_name():
    from climseg.plot import map_title

    assert map_title("x/data-2100-01-04-07-1.h5", "checkpoint best.pt, step 12") == \
        "data-2100-01-04-07-1: 2100-01-04 21:00 (checkpoint best.pt, step 12)"
    assert map_title("data-2011-06-01-01-1_0.h5") == "data-2011-06-01-01-1_0: 2011-06-01 03:00"
    # no date in the name, or one that is not a date: the name alone
    assert map_title("field.h5") == "field"
    assert map_title("data-2100-02-30-00-1.h5") == "data-2100-02-30-00-1"
    assert map_title("field.h5", "checkpoint a.pt") == "field (checkpoint a.pt)"


def test_a_cyclone_on_the_darkest_moisture_stays_visible():
    # The wettest air (the colour map's darkest blue) is where cyclones sit: the outline must
    # stand out there, so some of the pixels it changes are much brighter than the background.
    tmq = np.zeros((H, W), np.float32)
    tmq[10:40, 10:60] = 70.0                  # a dark block
    tc = np.zeros((H, W), np.uint8)
    tc[20:28, 25:35] = 1                      # a cyclone inside it
    with_tc = figure_to_array(plot_sample(tmq, prediction=tc)).astype(np.float32)
    without = figure_to_array(plot_sample(tmq, prediction=np.zeros_like(tc))).astype(np.float32)
    changed = np.abs(with_tc - without).sum(-1) > 30
    assert changed.any()
    luminance = with_tc @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    background = np.median((without @ np.array([0.2126, 0.7152, 0.0722], np.float32))[changed])
    assert background < 80                    # it is dark there
    # the halo around the outline: a few hundred bright pixels (none without it)
    assert (luminance[changed] > 200).sum() > 200


def test_the_validation_map_title_names_the_sample_and_its_time_when_given():
    from climseg.monitor import validation_sample

    x = torch.zeros(16, 8, 12)
    y = pred = torch.zeros(8, 12, dtype=torch.uint8)
    args = ((x, y, pred), None, np.zeros(16), np.ones(16), (8, 12, 16), 40)
    assert validation_sample(*args)[3] == "TMQ, validation, step 40"
    assert validation_sample(*args, path="v/data-2100-01-04-01-1.h5")[3] == \
        "data-2100-01-04-01-1: 2100-01-04 03:00 (TMQ, validation, step 40)"

"""The map: PNG of the expected pixel size, the TensorBoard array, and input checks."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from climseg.plot import DPI, PANEL_SIZE, figure_to_array, plot_sample, save_map

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

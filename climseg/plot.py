"""The one map of a sample: TMQ on a latitude/longitude grid with TC and AR masks on top.

Used by ``python -m climseg.predict`` (PNG next to each predicted mask) and by the trainer's
TensorBoard image panel (:func:`figure_to_array` gives the HWC uint8 image ``add_image`` takes).

The CAM5 grid is regular: row 0 is the southernmost latitude (−90°) and column 0 is the
Greenwich meridian (0°E), longitudes increasing eastwards to 360°. The full field of H x W cells
spans the globe (768 x 1152 cells of 0.234375° latitude x 0.3125° longitude for the real data),
so a crop whose first cell is row ``top``, column ``left`` of that field is drawn at its own
latitude/longitude extent, not stretched over the globe (:class:`GridWindow`). Figures are built on the Agg
canvas directly (no pyplot), so nothing needs a display and no figure is kept alive by a global
registry.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.patheffects import withStroke

from climseg.atomic import atomic_path

# Class id -> (legend label, colour). Red and orange stand out on the blue moisture map and
# stay distinct for the common forms of colour blindness when paired with the outline.
CLASS_STYLE = {
    1: ("Tropical cyclone (TC)", "#e4002b"),
    2: ("Atmospheric river (AR)", "#ff9f1c"),
}
# The outline of each event is drawn over a white halo: moist air, where cyclones sit, is the
# dark end of the colour map, on which a red line alone or a half-transparent fill is lost.
HALO = dict(linewidth=3.4, foreground="white")
LINE_WIDTH = 1.4
TMQ_CMAP = "YlGnBu"
TMQ_LABEL = "TMQ, total precipitable water (kg m$^{-2}$)"
FILL_ALPHA = 0.45
PANEL_SIZE = (6.4, 3.9)  # inches per panel; with DPI this fixes the PNG's pixel size
DPI = 100


def _as_array(a: Any, name: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor, possibly on the GPU
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"plot_sample: {name} must be 2-D (lat, lon), got shape {a.shape}")
    return a


# The real CAM5 field: 768 x 1152 cells, 0.234375° latitude x 0.3125° longitude.
CAM5_SHAPE = (768, 1152)
_LAT_SPAN, _LON_SPAN = 180.0, 360.0


@dataclass(frozen=True)
class GridWindow:
    """Where a (possibly cropped) field sits on the globe.

    ``top``/``left`` are the crop's first row and column in the full field of
    ``full_shape`` cells (row 0 at −90°N, column 0 at 0°E); the full field covers the globe, so
    one cell is 180/H degrees of latitude by 360/W degrees of longitude.
    """

    top: int = 0
    left: int = 0
    full_shape: tuple[int, int] | None = None  # None: the field drawn is the whole globe

    def extent(self, shape: tuple[int, int]) -> tuple[float, float, float, float]:
        """(west, east, south, north) in degrees of a field of ``shape`` cells at this window."""
        h, w = shape
        full_h, full_w = self.full_shape if self.full_shape is not None else (h, w)
        if not (0 <= self.top and self.top + h <= full_h and 0 <= self.left
                and self.left + w <= full_w):
            raise ValueError(f"plot_sample: a {h}x{w} field at row {self.top}, column "
                             f"{self.left} does not fit the full {full_h}x{full_w} grid")
        dlat, dlon = _LAT_SPAN / full_h, _LON_SPAN / full_w
        south = -90.0 + self.top * dlat
        west = self.left * dlon
        return west, west + w * dlon, south, south + h * dlat


def centre_window(full_shape: tuple[int, int], crop: tuple[int, int] | None) -> GridWindow:
    """The window of a centre crop, at the offset ``BatchLoader`` takes it
    (``(H - h) // 2, (W - w) // 2``); ``crop`` None is the whole field."""
    full_h, full_w = (int(v) for v in full_shape)
    if crop is None:
        return GridWindow(0, 0, (full_h, full_w))
    h, w = (int(v) for v in crop)
    return GridWindow((full_h - h) // 2, (full_w - w) // 2, (full_h, full_w))


def _cell_centres(extent, shape) -> tuple[np.ndarray, np.ndarray]:
    """Latitudes and longitudes (degrees) of the cell centres of a field drawn at ``extent``."""
    west, east, south, north = extent
    h, w = shape
    lat = south + (np.arange(h) + 0.5) * (north - south) / h
    lon = west + (np.arange(w) + 0.5) * (east - west) / w
    return lat, lon


def _ticks(lo: float, hi: float, steps: tuple[float, ...]) -> np.ndarray:
    """Round-degree ticks inside [lo, hi]: the largest step giving at least 4 of them, so the
    whole globe keeps its 60°/30° grid and a small crop still gets labelled degrees."""
    for step in steps:
        ticks = np.arange(np.ceil(lo / step) * step, hi + 1e-9, step)
        if len(ticks) >= 4:
            return ticks
    return np.array([lo, hi])


def _draw_panel(ax, tmq, mask, extent, norm_range, panel_title):
    vmin, vmax = norm_range
    west, east, south, north = extent
    lat, lon = _cell_centres(extent, tmq.shape)
    im = ax.imshow(tmq, origin="lower", extent=extent, aspect="auto",
                   cmap=TMQ_CMAP, vmin=vmin, vmax=vmax, interpolation="nearest")
    if mask is not None:
        for cls, (_, colour) in CLASS_STYLE.items():
            hit = mask == cls
            if not hit.any():
                continue
            fill = np.ma.masked_where(~hit, np.ones(hit.shape, np.uint8))
            ax.imshow(fill, origin="lower", extent=extent, aspect="auto",
                      cmap=ListedColormap([colour]), alpha=FILL_ALPHA, interpolation="nearest")
            if min(hit.shape) >= 2:  # contour needs a 2-D grid of at least 2 x 2 points
                ax.contour(lon, lat, hit.astype(np.float32), levels=[0.5], colors=[colour],
                           linewidths=LINE_WIDTH, path_effects=[withStroke(**HALO)])
    ax.set_xlim(west, east)
    ax.set_ylim(south, north)
    ax.set_xticks(_ticks(west, east, (60, 30, 20, 10, 5, 2, 1, 0.5, 0.25)))
    ax.set_yticks(_ticks(south, north, (30, 20, 10, 5, 2, 1, 0.5, 0.25)))
    ax.set_xlabel("Longitude (°E)")
    ax.set_ylabel("Latitude (°N)")
    ax.grid(color="0.35", linewidth=0.4, alpha=0.5)
    if panel_title:
        ax.set_title(panel_title)
    return im


def plot_sample(tmq, prediction=None, truth=None, title: str | None = None,
                window: GridWindow | None = None) -> Figure:
    """Map of one sample.

    ``window`` says where the field sits in the full grid (a crop's offsets, see
    :func:`centre_window`); without it the field is taken to be the whole globe.

    ``tmq`` is the raw TMQ field in kg m⁻², shape (lat, lon); from a normalized batch recover
    it as ``x / scale + shift`` for the TMQ channel. ``prediction`` and ``truth`` are class-id
    masks of the same shape (0 background, 1 TC, 2 AR). With ``truth`` the figure has two
    panels, truth left and prediction right (or the TMQ field alone when there is no
    prediction); otherwise one panel. Returns a figure on the Agg canvas.
    """
    tmq = _as_array(tmq, "tmq").astype(np.float32, copy=False)
    masks = {}
    for name, m in (("truth", truth), ("prediction", prediction)):
        if m is not None:
            m = _as_array(m, name)
            if m.shape != tmq.shape:
                raise ValueError(f"plot_sample: {name} has shape {m.shape} but tmq has {tmq.shape}")
            masks[name] = m

    if truth is not None:
        panels = [("Ground truth", masks["truth"]),
                  ("Prediction", masks.get("prediction"))]
    elif prediction is not None:
        panels = [("Prediction", masks["prediction"])]
    else:
        panels = [(None, None)]

    fig = Figure(figsize=(PANEL_SIZE[0] * len(panels), PANEL_SIZE[1]), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    extent = (window or GridWindow()).extent(tmq.shape)
    finite = tmq[np.isfinite(tmq)]
    norm_range = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for i, (ax, (panel_title, mask)) in enumerate(zip(axes, panels)):
        im = _draw_panel(ax, tmq, mask, extent, norm_range, panel_title)
        if i > 0:
            ax.set_ylabel("")
    fig.colorbar(im, ax=list(axes), orientation="vertical", fraction=0.025, pad=0.01,
                 label=TMQ_LABEL)
    if masks:
        handles = [Patch(facecolor=colour, edgecolor=colour, alpha=0.8, label=label)
                   for label, colour in CLASS_STYLE.values()]
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles),
                   frameon=False)
    if title:
        fig.suptitle(title)
    return fig


def map_title(path: str | os.PathLike, note: str | None = None) -> str:
    """A map's title: the sample's name, the date and time its name gives (when it gives one)
    and ``note`` (e.g. the checkpoint and step that made the prediction)."""
    from climseg.data.format import sample_time

    name = Path(path).stem
    when = sample_time(path)
    title = name if when is None else f"{name}: {when:%Y-%m-%d %H:%M}"
    return title if not note else f"{title} ({note})"


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as uint8 RGB, shape (height, width, 3) (TensorBoard ``dataformats='HWC'``)."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def save_map(fig: Figure, path: str | os.PathLike) -> None:
    """Write ``fig`` as a PNG at ``path`` atomically (temporary file, fsync, rename).

    The image is exactly the figure's size in inches times its dpi (no tight cropping), so
    callers can rely on its pixel size.
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)

"""The latitude/longitude grid of a climseg field, which its HDF5 files do not store.

climseg's sample files hold bare (lat, lon, channel) arrays. Their grid is taken to be the
regular global one that the shape implies, with **centred cells**: H rows of 180/H degrees from
the south pole (row 0) to the north pole, W columns of 360/W degrees eastward from 0°E, and
coordinates at the cell centres, so that the cells tile the sphere exactly. This is the
convention ``climseg.plot`` draws with. For CAM5's 768x1152 that is 0.234375° x 0.3125°,
latitudes -89.883 ... 89.883 and longitudes 0.156 ... 359.844. CAM5's own finite-volume grid
puts its first and last latitudes on the poles (spacing 180/767) and its first longitude on
0°E; the centres here differ from it by less than half a cell (0.12° in latitude, 0.16° in
longitude), well below the size of anything segmented.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LAT_SPAN = 180.0  # degrees, south pole to north pole
LON_SPAN = 360.0  # degrees, eastward from 0°E


@dataclass(frozen=True)
class RegularGrid:
    """Cell centres and edges (degrees) of a regular global grid of ``shape`` cells."""

    lat: np.ndarray        # (H,) centres, south to north
    lon: np.ndarray        # (W,) centres, eastward from 0°E
    lat_bounds: np.ndarray  # (H, 2) southern and northern edge of each row
    lon_bounds: np.ndarray  # (W, 2) western and eastern edge of each column

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.lat), len(self.lon)


def regular_grid(height: int, width: int) -> RegularGrid:
    """The centred-cell global grid of a ``height`` x ``width`` field (see the module doc)."""
    lat_edges = -90.0 + np.arange(height + 1) * (LAT_SPAN / height)
    lon_edges = np.arange(width + 1) * (LON_SPAN / width)
    return RegularGrid(lat=(lat_edges[:-1] + lat_edges[1:]) / 2,
                       lon=(lon_edges[:-1] + lon_edges[1:]) / 2,
                       lat_bounds=np.stack([lat_edges[:-1], lat_edges[1:]], axis=1),
                       lon_bounds=np.stack([lon_edges[:-1], lon_edges[1:]], axis=1))


# Mean Earth radius (IUGG, R1 = (2a + b) / 3 of WGS 84), the sphere event areas are taken on.
EARTH_RADIUS_KM = 6371.0088


def cell_areas_km2(grid: RegularGrid) -> np.ndarray:
    """(H, 1) area of one cell of each row, km²: the exact area of a cell between two
    latitudes on a sphere, R² Δλ (sin φ_north − sin φ_south), i.e. its cos-latitude weight
    integrated over the cell; the cells of a row are equal, and all sum to 4πR²."""
    south, north = np.radians(grid.lat_bounds).T
    dlon = np.radians(grid.lon_bounds[:, 1] - grid.lon_bounds[:, 0])[0]
    return (EARTH_RADIUS_KM ** 2 * dlon * (np.sin(north) - np.sin(south)))[:, np.newaxis]


# -- grids of other files, and the grid a model was trained on ---------------------------------
def axis_grid(lat: np.ndarray, lon: np.ndarray) -> RegularGrid:
    """The grid of cell centres ``lat`` (ascending) and ``lon`` (ascending, within 0..360),
    with edges half-way between centres: the outer latitude edges half a step out, clipped at
    the poles (a grid whose rows lie on the poles has half cells there)."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)

    def edges(c: np.ndarray) -> np.ndarray:
        step = (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else LAT_SPAN
        mid = (c[:-1] + c[1:]) / 2
        return np.concatenate([[c[0] - step / 2], mid, [c[-1] + step / 2]])

    lat_edges = np.clip(edges(lat), -LAT_SPAN / 2, LAT_SPAN / 2)
    lon_edges = edges(lon)
    return RegularGrid(lat=lat, lon=lon,
                       lat_bounds=np.stack([lat_edges[:-1], lat_edges[1:]], axis=1),
                       lon_bounds=np.stack([lon_edges[:-1], lon_edges[1:]], axis=1))


def grid_record(grid: RegularGrid) -> dict[str, list[float]]:
    """How a checkpoint records the grid its model learned on: per axis the first centre, the
    spacing and the count, in degrees (plain numbers, so ``torch.load(weights_only=True)``
    reads them). A regular grid is all three; its extent follows."""
    def axis(c: np.ndarray, span: float) -> list[float]:
        step = (c[-1] - c[0]) / (len(c) - 1) if len(c) > 1 else span
        return [float(c[0]), float(step), len(c)]

    return {"lat": axis(grid.lat, LAT_SPAN), "lon": axis(grid.lon, LON_SPAN)}


def grid_from_record(record) -> RegularGrid:
    """The grid :func:`grid_record` wrote; ValueError naming what is wrong with ``record``."""
    try:
        axes = [(float(record[k][0]), float(record[k][1]), int(record[k][2]))
                for k in ("lat", "lon")]
    except (KeyError, IndexError, TypeError, ValueError):
        raise ValueError(f"grid record {record!r} is not {{'lat': [first, step, count], "
                         f"'lon': [...]}}") from None
    if any(n < 1 or not np.isfinite(first) or not step > 0 for first, step, n in axes):
        raise ValueError(f"grid record {record!r} has a count below 1 or a step not above 0")
    lat, lon = (first + step * np.arange(n) for first, step, n in axes)
    return axis_grid(lat, lon)


def lat_step(grid: RegularGrid) -> float:
    return float((grid.lat[-1] - grid.lat[0]) / (len(grid.lat) - 1)) if len(grid.lat) > 1 \
        else LAT_SPAN


def lon_step(grid: RegularGrid) -> float:
    return float((grid.lon[-1] - grid.lon[0]) / (len(grid.lon) - 1)) if len(grid.lon) > 1 \
        else LON_SPAN


# Two grids are the same when every centre agrees to this share of a cell: far below anything
# a model resolves, far above the rounding of coordinates stored as float32 (2e-5 degrees).
SAME_GRID_TOLERANCE = 1e-3


def same_grid(a: RegularGrid, b: RegularGrid) -> bool:
    """Whether ``a`` and ``b`` have the same centres (longitudes compared modulo 360)."""
    if a.shape != b.shape:
        return False
    tol_lat = SAME_GRID_TOLERANCE * min(lat_step(a), lat_step(b))
    tol_lon = SAME_GRID_TOLERANCE * min(lon_step(a), lon_step(b))
    dlon = (a.lon - b.lon + LON_SPAN / 2) % LON_SPAN - LON_SPAN / 2
    return bool(np.abs(a.lat - b.lat).max() <= tol_lat and np.abs(dlon).max() <= tol_lon)


def describe(grid: RegularGrid) -> str:
    """``768x1152 (lat -89.883..89.883 by 0.2344, lon 0.156..359.844 by 0.3125)``."""
    return (f"{grid.shape[0]}x{grid.shape[1]} (lat {grid.lat[0]:.6g}..{grid.lat[-1]:.6g} by "
            f"{lat_step(grid):.4g}, lon {grid.lon[0]:.6g}..{grid.lon[-1]:.6g} by "
            f"{lon_step(grid):.4g})")

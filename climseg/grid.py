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

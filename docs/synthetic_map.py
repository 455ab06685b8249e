#!/usr/bin/env python
"""Draw docs/synthetic_map.png: one full-size synthetic sample, its vapour and its transport.

Left: TMQ with the labels the TECA-like rules give (TC red, AR orange). Right: the vapour
transport TMQ x |wind at 850 hPa| (2-degree mean) that defines ARs, with the AR threshold as a
contour: the moist tropical band and the weak-wind moist filaments carry little transport.

  .venv/bin/python docs/synthetic_map.py [--seed 1] [--index 1] [--output docs/synthetic_map.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from climseg.atomic import atomic_path  # noqa: E402
from climseg.data.format import CHANNELS  # noqa: E402
from climseg.data.synthetic import (IVT_THRESHOLD, generate_sample, sample_name,  # noqa: E402
                                    transport)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--index", type=int, default=1)
    p.add_argument("--output", type=Path,
                   default=Path(__file__).resolve().parent / "synthetic_map.png")
    args = p.parse_args(argv)
    data, labels = generate_sample(np.random.default_rng([args.seed, args.index]))
    ch = {n: i for i, n in enumerate(CHANNELS)}
    tmq = data[..., ch["TMQ"]]
    ivt = transport(data)
    h, w = tmq.shape
    extent = (0, 360, -90, 90)
    lat = np.linspace(-90, 90, h)
    lon = np.linspace(0, 360, w, endpoint=False)

    fig = Figure(figsize=(15, 4.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    im1 = ax1.imshow(tmq, origin="lower", extent=extent, aspect="auto", cmap="YlGnBu")
    for cls, colour in ((2, "orange"), (1, "red")):
        ax1.contour(lon, lat, (labels == cls).astype(np.float32), levels=[0.5],
                    colors=[colour], linewidths=1.3)
    ax1.set_title("TMQ (kg m$^{-2}$); labels: TC red, AR orange")
    fig.colorbar(im1, ax=ax1, fraction=0.04, pad=0.01)
    im2 = ax2.imshow(ivt, origin="lower", extent=extent, aspect="auto", cmap="magma_r",
                     vmax=float(np.percentile(ivt, 99.9)))
    ax2.contour(lon, lat, ivt, levels=[IVT_THRESHOLD], colors=["tab:cyan"], linewidths=0.8)
    ax2.set_title(f"TMQ x |V850|, 2° mean (kg m$^{{-1}}$ s$^{{-1}}$); contour: AR threshold "
                  f"{IVT_THRESHOLD:.0f}")
    fig.colorbar(im2, ax=ax2, fraction=0.04, pad=0.01)
    for ax in (ax1, ax2):
        ax.set_xticks(range(0, 361, 60))
        ax.set_yticks(range(-90, 91, 30))
        ax.set_xlabel("Longitude (°E)")
    ax1.set_ylabel("Latitude (°N)")
    fig.suptitle(f"Synthetic sample {sample_name(args.index)} (seed {args.seed}, {h}x{w})")
    with atomic_path(args.output) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

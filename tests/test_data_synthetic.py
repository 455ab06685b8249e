"""The synthetic generator: determinism, plausible values, class fractions, file names."""

from __future__ import annotations

import numpy as np
import pytest

from climseg.data.format import CHANNELS, NUM_CHANNELS, DataError, read_sample, validate_file
from climseg.data.synthetic import TARGET_FRACTIONS, generate_dataset, generate_sample

# Plausible ranges per channel (units of the CAM5 output), loose enough for TC extremes.
RANGES = {"TMQ": (0, 70), "U850": (-60, 60), "V850": (-60, 60), "UBOT": (-50, 50),
          "VBOT": (-50, 50), "QREFHT": (0, 0.03), "PS": (85000, 104000),
          "PSL": (90000, 106000), "T200": (195, 235), "T500": (220, 280),
          "PRECT": (0, 1e-5), "TS": (220, 315), "TREFHT": (215, 315), "Z1000": (-100, 100),
          "Z200": (10500, 13000), "ZBOT": (40, 80)}

# Stated tolerance: over 40 samples at 192x288 (and 300 at 64x96) the class fractions are
# within 25 % (TC) and 15 % (AR) of the real data's 0.05 % and 1.3 %.
TC_TOL, AR_TOL = 0.25, 0.15


def test_sample_shapes_dtypes_and_determinism():
    a = generate_sample(np.random.default_rng([3, 0]), 64, 96)
    b = generate_sample(np.random.default_rng([3, 0]), 64, 96)
    c = generate_sample(np.random.default_rng([3, 1]), 64, 96)
    assert a[0].shape == (64, 96, NUM_CHANNELS) and a[0].dtype == np.float32
    assert a[1].shape == (64, 96) and a[1].dtype == np.uint8
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("h, w", [(64, 96), (192, 288)])
def test_values_are_plausible(h, w):
    for i in range(5):
        data, labels = generate_sample(np.random.default_rng([0, i]), h, w)
        assert np.isfinite(data).all()
        assert set(np.unique(labels)) <= {0, 1, 2}
        for c, name in enumerate(CHANNELS):
            lo, hi = RANGES[name]
            assert lo <= data[..., c].min() and data[..., c].max() <= hi, name


@pytest.mark.parametrize("h, w, n", [(64, 96, 300), (192, 288, 40)])
def test_class_fractions_near_real_data(h, w, n):
    counts = np.zeros(3)
    for i in range(n):
        counts += np.bincount(generate_sample(np.random.default_rng([11, i]), h, w)[1].ravel(),
                              minlength=3)
    frac = counts / counts.sum()
    assert abs(frac[1] - TARGET_FRACTIONS[1]) <= TC_TOL * TARGET_FRACTIONS[1], frac
    assert abs(frac[2] - TARGET_FRACTIONS[2]) <= AR_TOL * TARGET_FRACTIONS[2], frac


def test_labels_follow_the_fields():
    """TC pixels sit in deep PSL lows with high TMQ; AR pixels are moister than background."""
    tmq, psl = CHANNELS.index("TMQ"), CHANNELS.index("PSL")
    tc_psl, bg_psl, ar_tmq, bg_tmq = [], [], [], []
    for i in range(10):
        data, labels = generate_sample(np.random.default_rng([5, i]), 192, 288)
        tc_psl.append(data[labels == 1, psl])
        bg_psl.append(data[labels == 0, psl])
        mid = np.abs(np.linspace(-90, 90, 192))[:, None].repeat(288, 1)
        band = (mid > 15) & (mid < 60)   # ARs are mid-latitude: compare with the same band
        ar_tmq.append(data[(labels == 2) & band, tmq])
        bg_tmq.append(data[(labels == 0) & band, tmq])
    assert np.concatenate(tc_psl).max() < np.percentile(np.concatenate(bg_psl), 1)
    assert np.median(np.concatenate(ar_tmq)) > np.percentile(np.concatenate(bg_tmq), 90)


def test_generate_dataset_names_and_files(tmp_path):
    paths = generate_dataset(tmp_path / "raw", 10, seed=2, height=32, width=48, progress=False)
    names = [p.name for p in paths]
    assert names[0] == "data-2100-01-01-00-1.h5" and names[9] == "data-2100-01-02-03-1.h5"
    assert names == sorted(names) and len(set(names)) == 10
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == names   # no temp files
    assert validate_file(paths[0]) == (32, 48, NUM_CHANNELS)
    again = generate_dataset(tmp_path / "again", 3, seed=2, height=32, width=48, progress=False,
                             workers=2)
    np.testing.assert_array_equal(read_sample(paths[2])[0], read_sample(again[2])[0])


def test_refuses_to_mix_with_existing_samples(tmp_path):
    out = tmp_path / "raw"
    generate_dataset(out, 3, seed=1, height=16, width=24, progress=False)
    with pytest.raises(DataError, match="already holds 3 data-\\*.h5 files; use --force"):
        generate_dataset(out, 2, seed=1, height=16, width=24, progress=False)
    generate_dataset(out, 2, seed=1, height=16, width=24, progress=False, force=True)
    assert len(list(out.iterdir())) == 2

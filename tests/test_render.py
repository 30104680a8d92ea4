import numpy as np
import pytest

from cai import render
from cai.catalog import CatalogError, read_sdss_mgs

TRAIN = "data/sdss_mgs/SDSS_MGS.train"


@pytest.fixture(scope="module")
def catalog():
    full = read_sdss_mgs(TRAIN)
    return {k: v[:200] for k, v in full.items()}


def test_catalog_columns_follow_the_true_order():
    cat = read_sdss_mgs(TRAIN)
    assert len(cat["redshift"]) == 5000
    assert cat["object_id"][0] == 1 and cat["object_id"].dtype == np.int64
    assert cat["redshift"].dtype == np.float32 and cat["redshift"][0] == pytest.approx(0.083125)
    assert cat["magnitudes"][0] == pytest.approx([19.655096, 18.149183, 17.298376, 16.878389, 16.562674])
    # the header omits eu, so u's error is column 11, not eg
    assert cat["magnitude_errors"][0] == pytest.approx([0.063680, 0.008182, 0.006024, 0.005716, 0.012887])


def test_catalog_errors_name_the_file_and_line(tmp_path):
    with pytest.raises(CatalogError, match="cannot read"):
        read_sdss_mgs(tmp_path / "missing")
    bad = tmp_path / "bad"
    bad.write_text("#zs u g\n" + " ".join(["0.1"] * 19) + "\n0.1 19.0 18.0\n")
    with pytest.raises(CatalogError, match="line 3: 3 columns"):
        read_sdss_mgs(bad)


def test_noiseless_fluxes_match_magnitudes(catalog):
    images = render.render_catalog(catalog, seed=3, noise=False)["images"].astype(np.float64)
    ratio = images.sum(axis=(2, 3)) / render.band_fluxes(catalog["magnitudes"])
    # the crop loses the wings of big galaxies, never gains flux
    assert ratio.max() < 1.01
    assert ratio.min() > 0.4
    assert np.median(ratio) > 0.9
    # one profile for all bands: the crop loss is the same in every band up to the PSF
    assert np.abs(ratio - ratio[:, 2:3]).max() < 0.02


def test_noisy_fluxes_match_within_noise(catalog):
    clean = render.render_catalog(catalog, seed=3, noise=False)["images"].sum(axis=(2, 3))
    noisy = render.render_catalog(catalog, seed=3)["images"].sum(axis=(2, 3))
    expected = np.asarray(render.CALIBRATION["sky_sigma"]) * 32  # std of a sum of 1024 pixels
    assert np.all(np.abs(noisy - clean) < 5 * expected)


def test_render_is_deterministic_per_seed(catalog):
    a = render.render_catalog(catalog, seed=7)
    b = render.render_catalog(catalog, seed=7)
    c = render.render_catalog(catalog, seed=8)
    assert np.array_equal(a["images"], b["images"])
    assert not np.array_equal(a["images"], c["images"])
    assert a["images"].shape == (200, 5, 32, 32) and a["images"].dtype == np.float32


def test_blank_sky_noise_matches_calibration():
    blank = {"magnitudes": np.full((300, 5), 40.0), "redshift": np.zeros(300, np.float32),
             "object_id": np.arange(1, 301)}  # flux 1e-7 nanomaggies: pure sky
    images = render.render_catalog(blank, seed=0)["images"]
    measured = images.std(axis=(0, 2, 3))
    assert measured == pytest.approx(render.CALIBRATION["sky_sigma"], rel=0.02)


def test_stored_calibration_is_what_the_cutouts_give():
    measured = render.measure_calibration(render.CALIBRATION_NPZ)
    for key, value in render.CALIBRATION.items():
        assert measured[key] == pytest.approx(value, rel=1e-3), key


def test_rendered_npz_round_trips(tmp_path, catalog):
    rendered = render.render_catalog({k: v[:10] for k, v in catalog.items()}, seed=1)
    path = render.save_rendered(tmp_path / "r.npz", rendered)
    assert sorted(np.load(path).files) == ["images", "magnitudes", "object_id", "redshifts"]
    back = render.load_rendered(path)
    for key in rendered:
        assert np.array_equal(back[key], rendered[key]) and back[key].dtype == rendered[key].dtype

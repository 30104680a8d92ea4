"""Shared fixtures for tests/ (the model fixtures live in the root conftest.py)."""

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="session")
def sdss_cutouts():
    """The 354 real SDSS DR17 cutouts: images float32 [354,5,32,32], aperture_mag float32 [354,5] (56 rows hold NaN)."""
    with np.load(DATA / "sdss_dr17_galaxies_32x32.npz") as npz:
        return npz["images"], npz["aperture_mag"]

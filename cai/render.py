"""Render 5-band 32x32 SDSS-like cutouts for catalogue galaxies (``cai render``).

The SDSS_MGS catalogues have real magnitudes and redshifts but no pixels, so
each galaxy gets a synthetic image whose band fluxes match its magnitudes:

- flux per band ``10**((22.5 - m) / 2.5)`` nanomaggies (SDSS zero point), the
  exact total of the noiseless, PSF-convolved profile on an infinite sky; the
  32x32 crop holds a little less for big galaxies (the wings fall outside);
- one Sersic profile for all bands (exponential disc or de Vaucouleurs, with
  axis ratio, position angle and sub-pixel centre jitter), so colours are
  uniform across the galaxy;
- half-light radius drawn from a log-normal calibrated on the real cutouts'
  ``r50_pix_r`` (PSF removed in quadrature), scaled gently with r magnitude
  (brighter galaxies look bigger). It deliberately depends on the magnitudes
  only, never on redshift: the images carry no information beyond the
  magnitudes, so nothing in them can leak the label;
- a Gaussian PSF per band (FWHM measured from the most compact real cutouts,
  scaled per band by typical SDSS seeing ratios);
- Gaussian sky noise per band with the std measured on the real cutouts'
  sigma-clipped border pixels.

Source Poisson noise is left out: the cutouts are background-subtracted
nanomaggies without their gain and sky level, so its size cannot be measured
here, and for Main Galaxy Sample galaxies (r <= 17.8) the sky dominates
almost every pixel but the core. Resampling-correlated noise is also ignored.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cai import paths
from cai.errors import InputError

SIZE = 32
BANDS = ("u", "g", "r", "i", "z")
ZERO_POINT = 22.5  # nanomaggies
PIXEL_ARCSEC = 0.396
CALIBRATION_NPZ = paths.SDSS_CUTOUTS

# Measured by measure_calibration(CALIBRATION_NPZ); tests/test_render.py checks they still agree.
CALIBRATION = {
    "source": "data/sdss_dr17_galaxies_32x32.npz",
    "cutouts": 354,
    "sky_sigma": [0.0343, 0.01306, 0.021, 0.0329, 0.12825],  # nanomaggies per pixel, u..z
    "psf_fwhm_pix": [4.25, 4.022, 3.795, 3.643, 3.719],  # u..z; r is 1.50 arcsec
    "r50_median_pix": 2.472,  # intrinsic (PSF removed), real cutouts
    "r50_log_sigma": 0.574,  # natural-log spread of the intrinsic r50
    "r50_pivot_mag": 21.5,  # median r of the real cutouts (crude 2" aperture)
}

# Typical SDSS seeing ratios to r (u and g worse, i and z a little better).
# NOTE: assumed, not measured: the cutouts give r50 in r only.
SEEING_RATIO = np.array([1.12, 1.06, 1.00, 0.96, 0.98])
SIZE_MAG_SLOPE = 0.05  # dex of r50 per magnitude brighter than the pivot; r=17 gives a median of 4.4 px
DEVAUC_FRACTION = 0.35  # share of de Vaucouleurs (n=4) profiles, the rest exponential (n=1)
R50_RANGE = (0.8, 15.0)  # pixels; keeps de Vaucouleurs cusps resolvable and wings sane

_OVERSAMPLE = 3
_MARGIN = 8  # pixels around the crop so the PSF can blur flux in from outside
_CHUNK = 256
_CORE_PIX = 4.0  # circularised radius inside which cusp sampling is corrected


def _border(images, width=4):
    """Border pixels of ``[N, 5, H, W]`` cutouts as ``[N, 5, K]``."""
    top, bottom = images[:, :, :width, :], images[:, :, -width:, :]
    left, right = images[:, :, width:-width, :width], images[:, :, width:-width, -width:]
    n, b = images.shape[:2]
    return np.concatenate([p.reshape(n, b, -1) for p in (top, bottom, left, right)], axis=2)


def _clipped_std(values, sigma=3.0, rounds=5):
    keep = np.ones(values.shape, dtype=bool)
    for _ in range(rounds):
        centre = np.median(values[keep])
        spread = 1.4826 * np.median(np.abs(values[keep] - centre))
        keep = np.abs(values - centre) < sigma * spread
    return float(values[keep].std())


def measure_calibration(npz_path=CALIBRATION_NPZ) -> dict:
    """Measure sky noise, seeing and galaxy sizes on the real SDSS cutouts.

    - sky: per band, the median over cutouts of the 3-sigma-clipped std of
      each cutout's 4-pixel border (mostly sky, galaxies are centred);
    - seeing: a Gaussian's half-light radius is FWHM/2, and the most compact
      objects are PSF-dominated, so the r FWHM is twice the 5th percentile of
      ``r50_pix_r``; other bands follow ``SEEING_RATIO``;
    - sizes: log-normal of ``sqrt(r50^2 - r50_psf^2)`` over resolved cutouts.
    """
    try:
        data = np.load(npz_path)
        images, r50, aperture = data["images"], data["r50_pix_r"], data["aperture_mag"]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read calibration cutouts {npz_path}: {exc}",
                         "expected data/sdss_dr17_galaxies_32x32.npz") from exc

    border = _border(images.astype(np.float64))
    sky = [float(np.median([_clipped_std(border[i, b]) for i in range(len(images))])) for b in range(5)]

    r50 = r50[np.isfinite(r50) & (r50 > 0)].astype(np.float64)
    psf_r50 = float(np.percentile(r50, 5))
    fwhm = 2.0 * psf_r50 * SEEING_RATIO
    resolved = r50[r50 > psf_r50 * 1.05]
    intrinsic = np.log(np.sqrt(resolved ** 2 - psf_r50 ** 2))
    r_mag = aperture[:, 2][np.isfinite(aperture[:, 2])]
    return {
        "source": "data/sdss_dr17_galaxies_32x32.npz",
        "cutouts": int(len(images)),
        "sky_sigma": [round(s, 5) for s in sky],
        "psf_fwhm_pix": [round(float(f), 3) for f in fwhm],
        "r50_median_pix": round(float(np.exp(np.median(intrinsic))), 3),
        "r50_log_sigma": round(float(0.5 * (np.percentile(intrinsic, 84) - np.percentile(intrinsic, 16))), 3),
        "r50_pivot_mag": round(float(np.median(r_mag)), 1),
    }


def band_fluxes(magnitudes) -> np.ndarray:
    """Nanomaggies from magnitudes on the SDSS 22.5 zero point."""
    return 10.0 ** ((ZERO_POINT - np.asarray(magnitudes, dtype=np.float64)) / 2.5)


def _sersic_b(n):
    # Ciotti & Bertin (1999) expansion; accurate to < 1e-4 for n >= 0.5
    return 2 * n - 1 / 3 + 4 / (405 * n) + 46 / (25515 * n ** 2)


def _draw_shapes(rng, magnitudes, calibration):
    n = len(magnitudes)
    devauc = rng.random(n) < DEVAUC_FRACTION
    index = np.where(devauc, 4.0, 1.0)
    log_r50 = (math.log(calibration["r50_median_pix"])
               + calibration["r50_log_sigma"] * rng.standard_normal(n)
               + SIZE_MAG_SLOPE * math.log(10) * (calibration["r50_pivot_mag"] - magnitudes[:, 2]))
    r50 = np.clip(np.exp(log_r50), *R50_RANGE)
    q = np.where(devauc, rng.uniform(0.5, 1.0, n), rng.uniform(0.2, 1.0, n))
    angle = rng.uniform(0.0, math.pi, n)
    centre = rng.uniform(-0.5, 0.5, (n, 2))  # sub-pixel jitter around the crop centre
    return {"sersic_n": index, "r50_pix": r50, "axis_ratio": q, "angle": angle, "offset": centre}


def _profiles(shapes):
    """Unit-flux Sersic profiles on the crop plus margin, ``[N, S, S]`` with S = 32 + 2*margin.

    Normalised analytically (the infinite-plane integral is 1), then
    integrated over each pixel by oversampling, so the crop loses only the
    flux that truly falls outside it.
    """
    side = SIZE + 2 * _MARGIN
    fine = side * _OVERSAMPLE
    # sub-pixel sample positions, pixel units, relative to the canvas centre
    axis = (np.arange(fine) + 0.5) / _OVERSAMPLE - side / 2
    n_gal = len(shapes["r50_pix"])
    dx = axis[None, None, :] - shapes["offset"][:, 0, None, None]
    dy = axis[None, :, None] - shapes["offset"][:, 1, None, None]
    cos, sin = np.cos(shapes["angle"])[:, None, None], np.sin(shapes["angle"])[:, None, None]
    q = shapes["axis_ratio"][:, None, None]
    major = dx * cos + dy * sin
    minor = -dx * sin + dy * cos
    radius = np.sqrt(q * major ** 2 + minor ** 2 / q)  # circularised radius, area-preserving

    n = shapes["sersic_n"][:, None, None]
    re = shapes["r50_pix"][:, None, None]
    b = _sersic_b(n)
    surface = np.exp(-b * ((radius / re) ** (1.0 / n) - 1.0))
    # total flux of I_e=1: 2 pi n re^2 e^b b^(-2n) Gamma(2n)
    gamma = np.array([math.gamma(2 * v) for v in shapes["sersic_n"]])[:, None, None]
    total = 2 * math.pi * n * re ** 2 * np.exp(b) * b ** (-2 * n) * gamma
    pixel_area = 1.0 / _OVERSAMPLE ** 2
    image = surface * (pixel_area / total)

    # Point samples overshoot a cuspy core (de Vaucouleurs, small r50) by up to
    # 25 %; rescale the samples inside the core so they hold exactly the
    # analytic flux there. The wings are smooth and sampled well.
    core = radius < _CORE_PIX
    held = (image * core).sum(axis=(1, 2), keepdims=True)
    image = np.where(core, image * (_enclosed(shapes, _CORE_PIX)[:, None, None] / np.maximum(held, 1e-300)), image)
    return image.reshape(n_gal, side, _OVERSAMPLE, side, _OVERSAMPLE).sum(axis=(2, 4))


def _enclosed(shapes, radius):
    """Analytic flux fraction of a unit Sersic within circularised ``radius``.

    The regularised lower incomplete gamma P(2n, x), in closed form for the
    integer 2n (2 or 8) of exponential and de Vaucouleurs profiles.
    """
    n = shapes["sersic_n"]
    x = _sersic_b(n) * (radius / shapes["r50_pix"]) ** (1.0 / n)
    terms = np.zeros_like(x)
    for k in range(8):
        terms += np.where(k < 2 * n, x ** k / math.factorial(k), 0.0)
    return 1.0 - np.exp(-x) * terms


def _psf_transfer(fwhm_pix, side):
    """Fourier transfer functions of unit Gaussian PSFs, ``[5, side, side//2+1]``."""
    sigma = np.asarray(fwhm_pix, dtype=np.float64) / (2 * math.sqrt(2 * math.log(2)))
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    k2 = (2 * math.pi) ** 2 * (fx ** 2 + fy ** 2)
    return np.exp(-0.5 * sigma[:, None, None] ** 2 * k2[None])


def render_noiseless(magnitudes, shapes, calibration) -> np.ndarray:
    """PSF-convolved band images in nanomaggies, ``[N, 5, 32, 32]`` float64."""
    flux = band_fluxes(magnitudes)
    side = SIZE + 2 * _MARGIN
    transfer = _psf_transfer(calibration["psf_fwhm_pix"], side)
    out = np.empty((len(flux), 5, SIZE, SIZE))
    for start in range(0, len(flux), _CHUNK):
        part = slice(start, start + _CHUNK)
        profile = _profiles({k: v[part] for k, v in shapes.items()})
        # the margin absorbs the FFT's wrap-around, which only touches the outer PSF width
        blurred = np.fft.irfft2(np.fft.rfft2(profile)[:, None] * transfer[None], s=(side, side))
        crop = blurred[:, :, _MARGIN:_MARGIN + SIZE, _MARGIN:_MARGIN + SIZE]
        out[part] = crop * flux[part, :, None, None]
    return out


def render_catalog(catalog: dict, seed: int = 0, calibration: dict | None = None, noise: bool = True) -> dict:
    """Render every galaxy of a catalogue (see ``cai.catalog.read_sdss_mgs``).

    Deterministic for a given seed. Returns ``images`` float32
    ``[N, 5, 32, 32]`` (nanomaggies), ``magnitudes`` float64 ``[N, 5]``,
    ``redshifts`` float32 ``[N]``, ``object_id`` int64 ``[N]``.
    """
    calibration = dict(CALIBRATION if calibration is None else calibration)
    magnitudes = np.asarray(catalog["magnitudes"], dtype=np.float64)
    if magnitudes.ndim != 2 or magnitudes.shape[1] != 5 or not np.isfinite(magnitudes).all():
        raise InputError(f"magnitudes must be finite [N, 5], got shape {magnitudes.shape}",
                         "read the catalogue with cai.catalog.read_sdss_mgs")
    rng = np.random.default_rng(seed)
    shapes = _draw_shapes(rng, magnitudes, calibration)
    images = render_noiseless(magnitudes, shapes, calibration)
    if noise:
        sky = np.asarray(calibration["sky_sigma"])[None, :, None, None]
        images += sky * rng.standard_normal(images.shape)
    return {
        "images": images.astype(np.float32),
        "magnitudes": magnitudes,
        "redshifts": np.asarray(catalog["redshift"], dtype=np.float32),
        "object_id": np.asarray(catalog["object_id"], dtype=np.int64),
    }


def save_rendered(path, rendered: dict) -> Path:
    """Write ``images``, ``magnitudes``, ``redshifts``, ``object_id`` to an .npz (the partitioner's convention)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{key: rendered[key] for key in ("images", "magnitudes", "redshifts", "object_id")})
    return path


def load_rendered(path) -> dict:
    """Read an .npz written by ``save_rendered``."""
    try:
        with np.load(path) as data:
            return {key: data[key] for key in ("images", "magnitudes", "redshifts", "object_id")}
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read rendered galaxies {path}: {exc}",
                         "make one with `cai render CATALOG --out FILE.npz`") from exc

"""Photo-z metrics, computed from partial sums that merge across partitions.

Conventions (Pasquet et al. 2019, the AstroMAE paper):

- ``d = z_pred - z_true``; MSE, MAE and R^2 are on ``d``, as regression losses.
- ``dz = d / (1 + z_true)``; bias = mean(dz), NMAD = 1.4826 * median(|dz - median(dz)|),
  outlier fraction = share of galaxies with ``|dz| > outlier_cut`` (0.05).

Every metric but NMAD is a ratio of sums, so each executor writes its
``partials`` and Summarize adds them up; NMAD needs the predictions themselves.
Galaxies without a known redshift (NaN ``z_true``) count as predicted but
enter no accuracy metric.
"""

from __future__ import annotations

import math

import numpy as np

OUTLIER_CUT = 0.05
NMAD_SCALE = 1.4826

_SUM_KEYS = ("n", "sum_d", "sum_d2", "sum_abs_d", "sum_dz", "sum_z", "sum_z2", "n_outliers")


def partials(z_pred, z_true, outlier_cut: float = OUTLIER_CUT) -> dict:
    """Mergeable sums for one partition; galaxies with NaN ``z_true`` are skipped."""
    z_pred = np.asarray(z_pred, dtype=np.float64).ravel()
    z_true = np.asarray(z_true, dtype=np.float64).ravel()
    if z_pred.shape != z_true.shape:
        raise ValueError(f"z_pred has {z_pred.size} values, z_true {z_true.size}")
    known = np.isfinite(z_true) & np.isfinite(z_pred)
    p, t = z_pred[known], z_true[known]
    d = p - t
    dz = d / (1.0 + t)
    return {
        "n": int(known.sum()),
        "sum_d": float(d.sum()),
        "sum_d2": float((d * d).sum()),
        "sum_abs_d": float(np.abs(d).sum()),
        "sum_dz": float(dz.sum()),
        "sum_z": float(t.sum()),
        "sum_z2": float((t * t).sum()),
        "n_outliers": int((np.abs(dz) > outlier_cut).sum()),
    }


def merge(parts) -> dict:
    """Add up the partial sums of several partitions."""
    total = dict.fromkeys(_SUM_KEYS, 0)
    for part in parts:
        for key in _SUM_KEYS:
            total[key] += part[key]
    return total


def nmad(z_pred, z_true) -> float:
    """Normalised median absolute deviation of dz; NaN when nothing is labelled."""
    z_pred = np.asarray(z_pred, dtype=np.float64).ravel()
    z_true = np.asarray(z_true, dtype=np.float64).ravel()
    known = np.isfinite(z_true) & np.isfinite(z_pred)
    if not known.any():
        return math.nan
    dz = (z_pred[known] - z_true[known]) / (1.0 + z_true[known])
    return float(NMAD_SCALE * np.median(np.abs(dz - np.median(dz))))


def finalize(sums: dict, nmad_value: float = math.nan) -> dict:
    """Turn merged sums into metrics; every metric is NaN when nothing was labelled."""
    n = sums["n"]
    if n == 0:
        nan = math.nan
        return {"labelled": 0, "mse": nan, "mae": nan, "bias": nan, "nmad": nan,
                "outlier_fraction": nan, "r2": nan}
    ss_tot = sums["sum_z2"] - sums["sum_z"] ** 2 / n
    return {
        "labelled": n,
        "mse": sums["sum_d2"] / n,
        "mae": sums["sum_abs_d"] / n,
        "bias": sums["sum_dz"] / n,
        "nmad": nmad_value,
        "outlier_fraction": sums["n_outliers"] / n,
        "r2": 1.0 - sums["sum_d2"] / ss_tot if ss_tot > 0 else math.nan,
    }


def evaluate(z_pred, z_true, outlier_cut: float = OUTLIER_CUT) -> dict:
    """All metrics at once, for a set of predictions held in memory."""
    return finalize(partials(z_pred, z_true, outlier_cut), nmad(z_pred, z_true))

import math

import numpy as np
import pytest

from cai import metrics


def test_metrics_match_hand_computed_values():
    z_true = np.array([0.1, 0.2, 0.3, 0.4])
    z_pred = np.array([0.11, 0.18, 0.30, 0.50])
    d = [0.01, -0.02, 0.0, 0.1]
    dz = [0.01 / 1.1, -0.02 / 1.2, 0.0, 0.1 / 1.4]
    got = metrics.evaluate(z_pred, z_true)

    assert got["mse"] == pytest.approx(sum(x * x for x in d) / 4)
    assert got["mae"] == pytest.approx(sum(abs(x) for x in d) / 4)
    assert got["bias"] == pytest.approx(sum(dz) / 4)
    med = (dz[0] + dz[2]) / 2  # sorted dz: -0.0167, 0, 0.0091, 0.0714
    dev = sorted(abs(x - med) for x in dz)
    assert got["nmad"] == pytest.approx(1.4826 * (dev[1] + dev[2]) / 2)
    assert got["outlier_fraction"] == pytest.approx(0.25)  # only 0.1/1.4 > 0.05
    ss_tot = sum((t - 0.25) ** 2 for t in z_true)
    assert got["r2"] == pytest.approx(1 - sum(x * x for x in d) / ss_tot)


def test_partials_merge_to_the_whole():
    rng = np.random.default_rng(0)
    z_true = rng.uniform(0.01, 0.3, 1000)
    z_pred = z_true + rng.normal(0, 0.02, 1000)
    whole = metrics.partials(z_pred, z_true)
    merged = metrics.merge(metrics.partials(z_pred[i:i + 300], z_true[i:i + 300]) for i in range(0, 1000, 300))
    assert merged["n"] == whole["n"] == 1000
    for key in whole:
        assert merged[key] == pytest.approx(whole[key])
    assert metrics.finalize(merged)["r2"] == pytest.approx(metrics.evaluate(z_pred, z_true)["r2"])


def test_unlabelled_galaxies_enter_no_metric():
    got = metrics.evaluate([0.1, 0.2], [math.nan, 0.25])
    assert got["labelled"] == 1
    assert got["mae"] == pytest.approx(0.05)
    empty = metrics.evaluate([0.1], [math.nan])
    assert empty["labelled"] == 0 and math.isnan(empty["mse"])

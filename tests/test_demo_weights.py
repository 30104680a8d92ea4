"""The shipped demo weights are what their model card says: version, float16 size, and test metrics."""

import json
from pathlib import Path

import pytest

from cai import train
from cai.model.weights import read_metadata

MODEL = Path(__file__).resolve().parents[1] / "model"
TEST = "data/sdss_mgs/SDSS_MGS.test"


def test_demo_weights_score_what_metrics_json_says_and_meet_the_targets():
    weights = MODEL / "astromae-demo.safetensors"
    recorded = json.loads((MODEL / "metrics.json").read_text())
    assert weights.stat().st_size <= 35e6
    assert read_metadata(weights)["dtype"] == "float16"
    assert read_metadata(weights)["model_version"] == recorded["model_version"]
    assert json.loads((MODEL / "train-settings.json").read_text())["model_version"] == recorded["model_version"]
    assert recorded["model_version"] in (MODEL / "MODEL_CARD.md").read_text()

    scored = train.score(weights, TEST, seed=0)["test"]  # all 5,000 test galaxies, the card's render
    for key in ("nmad", "outlier_fraction", "bias", "mae", "mse", "r2"):
        # kernels of other CPUs round differently; a few galaxies near |dz| = 0.05 may cross it
        assert scored[key] == pytest.approx(recorded["test"][key], rel=0.02, abs=3e-4), key
    assert scored["nmad"] <= 0.018 and scored["outlier_fraction"] <= 0.02 and abs(scored["bias"]) <= 0.003

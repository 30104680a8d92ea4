"""What an astronomer opens after a run: predictions as Parquet and CSV, summary.json, a PNG."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np


def read_predictions(csv_bytes: bytes):
    import pandas as pd

    return pd.read_csv(io.BytesIO(csv_bytes), dtype={"object_id": "int64", "flag": "string"})


def write_outputs(out: str | Path, summary: dict, csv_bytes: bytes) -> dict:
    """Write summary.json, predictions.csv, predictions.parquet and redshift.png into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "predictions.csv").write_bytes(csv_bytes)
    table = read_predictions(csv_bytes)
    table.to_parquet(out / "predictions.parquet", index=False)
    plot_redshifts(table, summary, out / "redshift.png")
    return {name: str(out / name) for name in
            ("summary.json", "predictions.parquet", "predictions.csv", "redshift.png")}


def plot_redshifts(table, summary: dict, path: Path) -> None:
    """Predicted against spectroscopic redshift, coloured by density, with the 1:1 line and the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(6.4, 6.0), dpi=120)
    known = table.dropna(subset=["z_pred", "z_true"])
    if len(known):
        z_true, z_pred = known["z_true"].to_numpy(), known["z_pred"].to_numpy()
        hi = float(max(np.nanpercentile(z_true, 99.9), np.nanpercentile(z_pred, 99.9))) * 1.05
        h = ax.hist2d(z_true, z_pred, bins=120, range=[[0, hi], [0, hi]], cmap="viridis", norm=LogNorm(), cmin=1)
        fig.colorbar(h[3], ax=ax, label="galaxies per cell")
        ax.plot([0, hi], [0, hi], color="crimson", lw=1, label="z_pred = z_spec")
        for sign in (1, -1):  # the outlier cut |dz| = 0.05
            ax.plot([0, hi], [sign * 0.05, hi + sign * 0.05 * (1 + hi)], color="crimson", lw=0.6, ls="--")
        ax.set_xlim(0, hi), ax.set_ylim(0, hi)
        ax.set_xlabel("spectroscopic redshift"), ax.set_ylabel("predicted redshift")
        ax.legend(loc="lower right", fontsize=8)
        text = "\n".join(_metric_lines(summary, len(known)))
        ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", ha="left", fontsize=8, family="monospace",
                bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "0.7"})
    else:
        z_pred = table["z_pred"].dropna().to_numpy()
        ax.hist(z_pred, bins=60, color="steelblue")
        ax.set_xlabel("predicted redshift"), ax.set_ylabel("galaxies")
        ax.text(0.97, 0.97, f"{len(z_pred):,} galaxies\nno spectroscopic redshifts",
                transform=ax.transAxes, va="top", ha="right", fontsize=8)
    ax.set_title(f"CAI {summary.get('model_version') or ''}".strip(), fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _metric_lines(summary: dict, labelled: int):
    def fmt(key, spec):
        value = summary.get(key)
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    return [
        f"galaxies  {labelled:,}",
        f"NMAD      {fmt('nmad', '.4f')}",
        f"bias      {fmt('bias', '+.2g')}",
        f"outliers  {fmt('outlier_fraction', '.2%')}",
        f"MAE       {fmt('mae', '.4f')}",
        f"MSE       {fmt('mse', '.2e')}",
        f"R^2       {fmt('r2', '.4f')}",
    ]

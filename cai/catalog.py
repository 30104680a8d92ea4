"""Read the SDSS Main Galaxy Sample catalogues in data/sdss_mgs/ (MLZ 1.2 format).

One comment line, then one galaxy a line, 19 whitespace-separated numbers.
The header omits ``eu``; the true order (the package's SDSS_MGS.inputs) is
``zs u g r i z u-g g-r r-i i-z eu eg er ei ez eu-g eg-r er-i ei-z``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cai.errors import InputError

COLUMNS = ("zs", "u", "g", "r", "i", "z", "u-g", "g-r", "r-i", "i-z",
           "eu", "eg", "er", "ei", "ez", "eu-g", "eg-r", "er-i", "ei-z")
BANDS = ("u", "g", "r", "i", "z")
_MAGS = slice(1, 6)
_ERRS = slice(10, 15)


class CatalogError(InputError):
    """A catalogue file is missing or a line of it is not 19 numbers."""


def read_sdss_mgs(path) -> dict:
    """Parse one SDSS_MGS file.

    Returns a dict of numpy arrays: ``object_id`` int64 ``[N]`` (1-based row
    number among the galaxies of the file), ``redshift`` float32 ``[N]``,
    ``magnitudes`` and ``magnitude_errors`` float64 ``[N, 5]`` (u, g, r, i, z).

    Raises:
        CatalogError: the file is missing, empty, or a line is malformed.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CatalogError(f"cannot read catalogue {path}: {exc.strerror or exc}",
                           "pass a file such as data/sdss_mgs/SDSS_MGS.train") from exc

    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != len(COLUMNS):
            raise CatalogError(f"{path} line {number}: {len(fields)} columns, expected {len(COLUMNS)}",
                               "columns: " + " ".join(COLUMNS))
        try:
            values = [float(f) for f in fields]
        except ValueError as exc:
            raise CatalogError(f"{path} line {number}: not a number ({exc})",
                               "every column must be numeric") from exc
        if not all(np.isfinite(values)):
            raise CatalogError(f"{path} line {number}: NaN or infinite value",
                               "every column must be finite")
        rows.append(values)
    if not rows:
        raise CatalogError(f"{path}: no galaxies", "expected one galaxy per line after a '#' header")

    table = np.asarray(rows, dtype=np.float64)
    return {
        "object_id": np.arange(1, len(table) + 1, dtype=np.int64),
        "redshift": table[:, 0].astype(np.float32),
        "magnitudes": table[:, _MAGS].copy(),
        "magnitude_errors": table[:, _ERRS].copy(),
    }


def subset(catalog: dict, index) -> dict:
    """The rows ``index`` of every array in ``catalog``."""
    return {key: value[index] for key, value in catalog.items()}

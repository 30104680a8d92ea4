"""Constant memory, shown: the same run on N and on k*N galaxies, peak RSS of each.

Each run is a fresh ``cai run --workers 1`` process (executor in-process, so
its peak covers partition reading, inference and Summarize); its peak is the
kernel's high-water mark (VmHWM) of that process alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cai.paths import SDSS_CUTOUTS as CUTOUTS


def write_survey(folder: Path, galaxies: int, seed: int = 0) -> Path:
    """A folder of memory-mapped .npy files: real cutouts tiled, magnitudes jittered; never all in memory."""
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(CUTOUTS) as npz:
        images, mags = npz["images"], npz["aperture_mag"]
    keep = np.isfinite(mags).all(axis=1)
    images, mags = images[keep], mags[keep]
    rng = np.random.default_rng(seed)
    out_images = np.lib.format.open_memmap(folder / "images.npy", "w+", np.float32, (galaxies, 5, 32, 32))
    out_mags = np.lib.format.open_memmap(folder / "magnitudes.npy", "w+", np.float64, (galaxies, 5))
    for start in range(0, galaxies, len(images)):
        n = min(len(images), galaxies - start)
        out_images[start:start + n] = images[:n]
        out_mags[start:start + n] = mags[:n] + rng.normal(0, 0.01, (n, 5))
    out_images.flush(), out_mags.flush()
    np.save(folder / "redshifts.npy", rng.uniform(0.02, 0.3, galaxies).astype(np.float32))
    del out_images, out_mags
    return folder


# The measured command runs in this wrapper, which writes its own VmHWM at exit. Not the
# rusage of os.wait4: a child's ru_maxrss keeps the high-water mark of the process it was
# spawned from (Linux carries it across exec), so it would report this bench's own peak.
_PEAK_WRAPPER = """
import atexit, os, sys
def _peak():
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    with open(os.environ["CAI_PEAK_FILE"], "w") as out:
        out.write(str(kib))
atexit.register(_peak)
from cai.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _measured(args: list[str], folder: Path) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of one ``cai ARGS`` process, its own high-water mark alone."""
    peak_file = folder / "peak.kib"
    started = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", _PEAK_WRAPPER, *args], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, env={**os.environ, "CAI_PEAK_FILE": str(peak_file)})
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise RuntimeError(f"cai {' '.join(args)} failed: {child.stderr.decode()[-2000:]}")
    return int(peak_file.read_text()) / 1024.0, seconds


def memory(galaxies: int = 5000, factor: int = 4, model: str | None = None, size_mb: float = 25,
           batch_size: int = 256) -> list[dict]:
    """Peak memory of partitioning and of running N and factor*N galaxies."""
    from cai.run import prepare_model

    onnx = str(prepare_model(model, "onnxruntime"))  # export once, outside the measured runs
    rows = []
    with tempfile.TemporaryDirectory(prefix="cai-bench-") as tmp:
        for n in (galaxies, galaxies * factor):
            source = write_survey(Path(tmp) / f"src-{n}", n)
            parts, out = Path(tmp) / f"parts-{n}", Path(tmp) / f"out-{n}"
            part_mb, part_s = _measured(["partition", str(source), "--size-mb", str(size_mb),
                                         "--out", str(parts)], Path(tmp))
            run_mb, run_s = _measured(["run", "--data", str(parts), "--model", onnx, "--out", str(out),
                                       "--workers", "1", "--batch-size", str(batch_size)], Path(tmp))
            rows.append({"galaxies": n, "dataset_mb": round(n * 20532 / 2**20, 1),
                         "partition_peak_mb": round(part_mb, 1), "run_peak_mb": round(run_mb, 1),
                         "run_seconds": round(run_s, 1)})
    return rows

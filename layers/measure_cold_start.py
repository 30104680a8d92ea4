"""Measure the cold start each executor runtime pays for its layer, on this machine.

Lambda extracts layers to /opt before the handler's first import; what the runtime then pays is
measured here in a fresh interpreter per run (``python -I -S``: the layer folders and the stdlib
only, writing no .pyc), with the page cache dropped first where this machine allows it, as on a new Lambda host:

- ONNX Runtime: ``import numpy, onnxruntime``, then ``InferenceSession`` on AstroMAE's ONNX graph.
- PyTorch: unpack ``torch.tar.zst`` into a fresh /tmp folder, then ``import torch``, then build
  AstroMAE and load its weights.

Both then time one batch of 512 galaxies and report peak memory. The layers must be built for
this machine's Python (``layers/build.py ... --python-version 3.11`` here); the model is AstroMAE
with random weights (same graph and size as the real one), exported with cai.model.export.

Usage: ``python layers/measure_cold_start.py [--runs 3] [--json build/measure/cold_start.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "build" / "measure"
BATCH = 512

# VmHWM, not getrusage: ru_maxrss survives exec, so a probe would report this script's own peak
PEAK = """
def peak_rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
"""

ONNX_PROBE = PEAK + """
import json, sys, time
sys.path[:0] = {paths!r}
t0 = time.perf_counter()
import numpy as np
import onnxruntime as ort
t1 = time.perf_counter()
session = ort.InferenceSession({model!r}, providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
rng = np.random.default_rng(0)
feed = {{"image": rng.random(({batch}, 5, 32, 32), dtype=np.float32),
        "magnitude": rng.random(({batch}, 5), dtype=np.float32)}}
session.run(None, feed)
t3 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "model_s": t2 - t1, "first_batch_s": t3 - t2,
                  "peak_rss_mb": peak_rss_mb()}}))
"""

TORCH_PROBE = PEAK + """
import json, sys, time
sys.path[:0] = {paths!r}
t0 = time.perf_counter()
import cai_torch_layer
cai_torch_layer.ensure_torch({archive!r}, {target!r})
t1 = time.perf_counter()
import torch
t2 = time.perf_counter()
from safetensors.numpy import load_file
from cai.model.astromae import AstroMAE
model = AstroMAE().eval()
model.load_state_dict({{k: torch.from_numpy(v) for k, v in load_file({weights!r}).items()}})
t3 = time.perf_counter()
with torch.inference_mode():
    model(torch.rand({batch}, 5, 32, 32), torch.rand({batch}, 5))
t4 = time.perf_counter()
print(json.dumps({{"unpack_s": t1 - t0, "import_s": t2 - t1, "model_s": t3 - t2, "first_batch_s": t4 - t3,
                  "peak_rss_mb": peak_rss_mb()}}))
"""


def drop_page_cache() -> bool:
    """Forget cached file pages (root on Linux only), so layer files are read from disk again."""
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def probe(code: str) -> dict:
    # -B: Lambda's /opt is read-only, so a run there never leaves .pyc behind for the next one
    out = subprocess.run([sys.executable, "-B", "-I", "-S", "-c", code],
                         capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        raise SystemExit(f"probe failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_model() -> tuple[Path, Path]:
    """AstroMAE with random weights as safetensors (float32) and as ONNX, made once."""
    weights, onnx_path = WORK / "astromae-random.safetensors", WORK / "astromae-random.onnx"
    if not onnx_path.exists():
        sys.path.insert(0, str(ROOT))
        import torch
        from cai.model.astromae import AstroMAE
        from cai.model.export import export_onnx
        from cai.model.weights import save_weights
        torch.manual_seed(0)
        save_weights(AstroMAE().eval().state_dict(), weights, dtype="float32",
                     metadata={"model_version": "random-for-measurement"})
        export_onnx(weights, onnx_path)
    return weights, onnx_path


def extract(zip_path: Path, dest: Path) -> Path:
    """Unzip a layer as Lambda does into /opt; returns the folder."""
    if not zip_path.exists():
        raise SystemExit(f"{zip_path} is missing: build it with layers/build.py --python-version "
                         f"{sys.version_info.major}.{sys.version_info.minor}")
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(dest)
    return dest


def summarize(runs: list[dict]) -> dict:
    keys = runs[0].keys()
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--arch", default="x86_64")
    parser.add_argument("--json", type=Path, default=WORK / "cold_start.json")
    args = parser.parse_args(argv)

    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    layers = ROOT / "build" / "layers"
    weights, onnx_path = make_model()
    results: dict = {"python": py, "machine": platform.processor() or platform.machine(),
                     "batch": BATCH, "page_cache_dropped": None}
    with tempfile.TemporaryDirectory(prefix="cai-opt-") as tmp:
        tmp = Path(tmp)
        inference = extract(layers / f"inference-py{py}-{args.arch}.zip", tmp / "inference")
        torch_opt = extract(layers / f"torch-py{py}-{args.arch}.zip", tmp / "torch")
        onnx_runs, torch_runs = [], []
        for run in range(args.runs):
            results["page_cache_dropped"] = drop_page_cache()
            onnx_runs.append(probe(ONNX_PROBE.format(
                paths=[str(inference / "python")], model=str(onnx_path), batch=BATCH)))
            results["page_cache_dropped"] &= drop_page_cache()
            torch_runs.append(probe(TORCH_PROBE.format(
                paths=[str(torch_opt / "python"), str(inference / "python"), str(ROOT)],
                archive=str(torch_opt / "torch" / "torch.tar.zst"), target=str(tmp / f"cai-torch-{run}"),
                weights=str(weights), batch=BATCH)))
        results["onnxruntime"] = summarize(onnx_runs)
        results["torch"] = summarize(torch_runs)
        results["runs"] = {"onnxruntime": onnx_runs, "torch": torch_runs}
    for name in ("inference", "torch"):
        manifest = json.loads((layers / f"{name}-py{py}-{args.arch}.json").read_text())
        results[f"{name}_layer"] = {k: manifest["zip"][k] for k in ("unzipped_bytes", "zipped_bytes")}
        if "archive" in manifest:
            results[f"{name}_layer"]["unpacked_bytes"] = manifest["archive"]["unpacked_bytes"]

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    o, t = results["onnxruntime"], results["torch"]
    print(f"median of {args.runs} runs, Python {py}, page cache dropped: {results['page_cache_dropped']}")
    print(f"onnxruntime: import {o['import_s']:.2f} s + session {o['model_s']:.2f} s"
          f" = {o['import_s'] + o['model_s']:.2f} s; first batch {o['first_batch_s']:.2f} s;"
          f" peak {o['peak_rss_mb']:.0f} MB")
    print(f"torch:       unpack {t['unpack_s']:.2f} s + import {t['import_s']:.2f} s + model {t['model_s']:.2f} s"
          f" = {t['unpack_s'] + t['import_s'] + t['model_s']:.2f} s; first batch {t['first_batch_s']:.2f} s;"
          f" peak {t['peak_rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

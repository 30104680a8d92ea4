"""``cai convert``, ``cai export`` and ``cai bench engine``.

``register(subparsers)`` adds the subcommands; each sets ``func(args) -> int``.
The benchmark runs each runtime in its own subprocess so that peak memory
(``ru_maxrss``) belongs to one runtime, and measures the machine's float32
matmul rate in that same process, on the same thread count, as the roofline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cai.commands import bench_subparsers
from cai.errors import CaiError, InputError, WeightsError
from cai.paths import DEMO_WEIGHTS, REPO, SDSS_CUTOUTS as CUTOUTS

GFLOP_PER_GALAXY = 0.219  # the AstroMAE paper's count for one forward pass
_WORKER_FLAG = "--bench-worker"


def register(subparsers) -> None:
    """Add ``convert``, ``export`` and ``bench engine`` to the ``cai`` command."""
    convert = subparsers.add_parser(
        "convert", help="official pickled .pt checkpoint -> safetensors weights, without running the pickle",
        description="Read the authors' DataParallel checkpoint through an allow-listed unpickler "
                    "(no code from the file runs, torch is not used to read it) and write project weights.")
    convert.add_argument("checkpoint", type=Path, help="the official .pt file")
    convert.add_argument("--out", type=Path, required=True, help="weights file to write (.safetensors)")
    convert.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                         help="float storage type (default float32: exact)")
    convert.add_argument("--model-version", default=None, help="model_version to record (default astromae-official)")
    convert.set_defaults(func=run_convert)

    export = subparsers.add_parser("export", help="safetensors weights -> ONNX for ONNX Runtime")
    export.add_argument("--weights", type=Path, required=True, help="a .safetensors weights file")
    export.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    export.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18, the exporter's lowest)")
    export.set_defaults(func=run_export)

    bench_parsers = bench_subparsers(subparsers)
    engine = bench_parsers.add_parser(
        "engine", help="galaxies/s, roofline fraction and peak memory per runtime and batch size",
        description="Times the inference engine on real SDSS cutouts (tiled to --galaxies), after a "
                    "warm-up, each runtime in its own process.")
    engine.add_argument("--weights", type=Path, default=None,
                        help=f"weights (.safetensors, or .onnx for onnxruntime only); default {DEMO_WEIGHTS} "
                             "if present, else a freshly initialised model")
    engine.add_argument("--runtimes", nargs="+", choices=("onnxruntime", "torch"),
                        default=["onnxruntime", "torch"], help="default: both")
    engine.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 64, 128, 256, 512])
    engine.add_argument("--galaxies", type=int, default=1024, help="galaxies timed per batch size (default 1024)")
    engine.add_argument("--threads", type=int, default=None, help="threads per runtime (default: all cores)")
    engine.add_argument("--data", type=Path, default=None, help=f"cutouts .npz (default {CUTOUTS})")
    engine.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    engine.set_defaults(func=run_bench_engine)


def run_convert(args) -> int:
    from cai.model.pickle_safe import convert_checkpoint

    meta = {"model_version": args.model_version} if args.model_version else None
    started = time.perf_counter()
    out = convert_checkpoint(args.checkpoint, args.out, dtype=args.dtype, metadata=meta)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype}) "
          f"in {time.perf_counter() - started:.1f} s; no code from the pickle was run")
    return 0


def run_export(args) -> int:
    from cai.model.export import export_onnx

    started = time.perf_counter()
    out = export_onnx(args.weights, args.out, opset=args.opset)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - started:.1f} s")
    return 0


def _default_weights() -> tuple[Path, str]:
    if DEMO_WEIGHTS.is_file():
        return DEMO_WEIGHTS, f"demo weights {DEMO_WEIGHTS}"
    import torch

    from cai.model.astromae import AstroMAE
    from cai.model.engine import cache_dir
    from cai.model.weights import save_weights

    # seeded, so the file's bytes and hence its cached ONNX export are reused by the next run
    path = cache_dir() / "astromae-random-seed0.safetensors"
    if not path.is_file():
        torch.manual_seed(0)
        save_weights(AstroMAE().eval().state_dict(), path, dtype="float32", metadata={"model_version": "random-init"})
    return path, f"no {DEMO_WEIGHTS}: a freshly initialised model (random weights, timing only) in {path}"


def _cutouts_path(given) -> Path:
    candidate = given or CUTOUTS
    if candidate.is_file():
        return candidate
    raise InputError(f"no cutouts file at {given or CUTOUTS}",
                     "pass --data PATH to a .npz with images and aperture_mag")


def run_bench_engine(args) -> int:
    if any(b < 1 for b in args.batch_sizes) or args.galaxies < 1:
        raise InputError("batch sizes and --galaxies must be positive", f"got {args.batch_sizes}, {args.galaxies}")
    threads = args.threads or len(os.sched_getaffinity(0))
    data = _cutouts_path(args.data)
    if args.weights is None:
        weights, note = _default_weights()
    else:
        weights, note = args.weights, f"weights {args.weights}"
        if not weights.is_file():
            raise WeightsError(f"no such weights file: {weights}", "pass --weights PATH")
    print(note)

    runs = []
    for runtime in args.runtimes:
        model = weights
        if runtime == "onnxruntime" and weights.suffix == ".safetensors":
            from cai.model.engine import cached_onnx

            # export here, not in the worker, so the worker's peak memory is ONNX Runtime's alone
            model = cached_onnx(weights)
        elif runtime == "torch" and weights.suffix == ".onnx":
            print("skipping torch: it needs .safetensors weights, not an .onnx")
            continue
        job = {"runtime": runtime, "model": str(model), "threads": threads, "data": str(data),
               "galaxies": args.galaxies, "batch_sizes": sorted(set(args.batch_sizes))}
        print(f"running {runtime} ({threads} threads) ...", flush=True)
        runs.append(_spawn_worker(job))

    roofline = max(r["roofline_gflops"] for r in runs) if runs else float("nan")
    for run in runs:
        for row in run["rows"]:
            row["gflops"] = row["galaxies_per_s"] * GFLOP_PER_GALAXY
            row["roofline_fraction"] = row["gflops"] / roofline
    _print_table(runs, roofline, threads, args.galaxies)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"weights": str(weights), "note": note, "threads": threads, "galaxies": args.galaxies,
                  "gflop_per_galaxy": GFLOP_PER_GALAXY, "roofline_gflops": roofline, "runs": runs}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _spawn_worker(job: dict) -> dict:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(job["threads"])  # the roofline matmul must use the engine's thread count
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "cai.commands.model_tools", _WORKER_FLAG, json.dumps(job)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise CaiError(f"the {job['runtime']} benchmark process failed (exit {proc.returncode}): "
                       f"{proc.stderr.strip()[-800:]}", "run it again; if it persists, try fewer --galaxies")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _print_table(runs, roofline, threads, galaxies):
    per_process = ", ".join(f"{r['runtime']} {r['roofline_gflops']:.1f}" for r in runs)
    print(f"\nroofline: {roofline:.1f} GFLOP/s float32 matmul on {threads} threads "
          f"(per process: {per_process}); "
          f"{GFLOP_PER_GALAXY} GFLOP/galaxy; {galaxies} galaxies per row")
    header = f"{'runtime':<12} {'batch':>6} {'galaxies/s':>11} {'GFLOP/s':>8} {'roofline':>9} {'peak RSS MB':>12}"
    print(header)
    print("-" * len(header))
    for run in runs:
        for row in run["rows"]:
            print(f"{run['runtime']:<12} {row['batch_size']:>6} {row['galaxies_per_s']:>11.1f} "
                  f"{row['gflops']:>8.1f} {row['roofline_fraction']:>8.1%} {row['peak_rss_mb']:>12.0f}")
    for run in runs:
        print(f"{run['runtime']}: load {run['load_s']:.2f} s, RSS after load {run['rss_after_load_mb']:.0f} MB, "
              f"model_version {run['model_version']}")
    print("peak RSS is the process high-water mark, so it can only grow down each runtime's rows")


def _matmul_gflops(runtime: str, threads: int) -> float:
    """Best float32 matmul rate of numpy (and torch, in the torch process) on ``threads`` threads."""
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    rates = []

    def best(fn):
        fn()  # warm-up: thread pools, page faults
        times = []
        for _ in range(5):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return 2 * n**3 / min(times) / 1e9

    rates.append(best(lambda: a @ b))
    if runtime == "torch":
        import torch

        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        rates.append(best(lambda: ta @ tb))
    return max(rates)


def _bench_worker(job: dict) -> dict:
    import numpy as np

    from cai.model.engine import Engine
    from cai.pipeline import peak_memory_mb

    with np.load(job["data"]) as npz:
        images, mags = npz["images"], npz["aperture_mag"]
    mags = np.where(np.isfinite(mags), mags, np.nanmedian(mags, axis=0))  # timing only: every galaxy runs
    reps = -(-job["galaxies"] // images.shape[0])
    images = np.ascontiguousarray(np.tile(images, (reps, 1, 1, 1))[: job["galaxies"]])
    mags = np.ascontiguousarray(np.tile(mags, (reps, 1))[: job["galaxies"]])

    started = time.perf_counter()
    engine = Engine.load(job["model"], runtime=job["runtime"], threads=job["threads"])
    load_s = time.perf_counter() - started
    rss_after_load = peak_memory_mb()

    rows = []
    for batch in job["batch_sizes"]:
        warm = min(batch, len(images))
        engine.predict(images[:warm], mags[:warm], batch_size=batch)
        started = time.perf_counter()
        engine.predict(images, mags, batch_size=batch)
        elapsed = time.perf_counter() - started
        rows.append({"batch_size": batch, "seconds": elapsed, "galaxies_per_s": len(images) / elapsed,
                     "peak_rss_mb": peak_memory_mb()})
    # last, so its 48 MB of matrices stay out of the engine's memory figures
    roofline = _matmul_gflops(job["runtime"], job["threads"])
    return {"runtime": job["runtime"], "threads": job["threads"], "roofline_gflops": roofline,
            "load_s": load_s, "rss_after_load_mb": rss_after_load, "model_version": engine.model_version,
            "rows": rows}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == _WORKER_FLAG:
    print(json.dumps(_bench_worker(json.loads(sys.argv[2]))))

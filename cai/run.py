"""``cai run``: one command, three backends, the same handlers and payloads.

Resolves the data (partitions as they are, or any source partitioned on the
fly), the model (``.onnx`` as it is; ``.safetensors`` exported to ONNX once
for the default runtime), builds the run payload, hands it to a backend and
writes what an astronomer reads into ``out``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cai import paths
from cai.errors import InputError
from cai.partitions import MANIFEST, SUFFIX, write_partitions
from cai.store import LocalStore

log = logging.getLogger("cai")

DEFAULT_DATA = paths.SDSS_MGS_TEST
DEFAULT_MODEL = paths.DEMO_WEIGHTS
BACKENDS = ("local", "emulated", "aws")


def shown(path) -> str:
    """A path as the user would type it: relative to the working folder when it lies inside it."""
    if "://" in str(path):
        return str(path)
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def is_partition_folder(path: Path) -> bool:
    return path.is_dir() and ((path / MANIFEST).is_file() or any(path.glob(f"*{SUFFIX}")))


def prepare_partitions(data: list[str], out: Path, size_mb: float) -> Path:
    """A folder of partitions: ``data`` itself when it is one, else ``out/partitions`` made from it."""
    if len(data) == 1 and is_partition_folder(Path(data[0])):
        return Path(data[0]).resolve()
    target = (out / "partitions").resolve()
    for stale in target.glob(f"*{SUFFIX}"):
        stale.unlink()  # a smaller dataset must not inherit the last run's extra partitions
    log.info("partitioning %s into %s (%s MB partitions)", ", ".join(map(shown, data)), shown(target), size_mb)
    write_partitions(data, LocalStore(target), "", size_mb)
    return target


def prepare_model(model: str | None, runtime: str) -> Path:
    """The model file the executors load: ONNX for onnxruntime (exported once from safetensors)."""
    path = Path(model) if model else DEFAULT_MODEL
    if not path.is_file():
        raise InputError(f"no model file {path}", "pass --model WEIGHTS.safetensors or MODEL.onnx")
    if runtime == "onnxruntime" and path.suffix == ".safetensors":
        from cai.model.engine import cached_onnx

        return Path(cached_onnx(path))
    return path.resolve()


def run(data: list[str] | None = None, model: str | None = None, out: str = "results",
        backend: str = "local", batch_size: int = 256, workers: int | None = None,
        runtime: str = "onnxruntime", size_mb: float = 25, max_partitions: int | None = None,
        partitions_per_executor: int = 1, progress: bool = True, **aws_options) -> tuple[dict, dict]:
    """Run CAI end to end; return (summary, output paths)."""
    from cai import report

    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}", f"choose one of {', '.join(BACKENDS)}")
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"batch_size": batch_size, "runtime": runtime, "max_partitions": max_partitions,
                "partitions_per_executor": partitions_per_executor}

    if backend == "aws":
        from cai.backends import aws

        summary, csv_bytes = aws.run(data=data, model=model, settings=settings, workdir=out_dir, size_mb=size_mb,
                                     **aws_options)
    else:
        missing = [d for d in data or [] if not Path(d).exists()]
        if missing:
            raise InputError(f"no such data: {', '.join(missing)}",
                             "give partitions (a folder) or source files: .npz, .h5, .pt, a folder of .npy, a catalog")
        model_path = prepare_model(model, runtime)  # before partitioning: a bad model fails at once
        partitions = prepare_partitions(data or [str(DEFAULT_DATA)], out_dir, size_mb)
        if backend == "local":
            from cai.backends import local

            results = out_dir / "run"
            payload = {"bucket": "/", "partition_prefix": f"{partitions}/", "model_key": str(model_path),
                       "result_prefix": f"{results}/", **settings}
            summary = local.run(payload, workers=workers, progress=progress)
            csv_bytes = (results / "predictions.csv").read_bytes()
        else:
            from cai.backends import emulated

            summary, csv_bytes = emulated.run_pipeline(partitions, model_path, settings)
    outputs = report.write_outputs(out_dir, summary, csv_bytes)
    return summary, outputs


def describe(summary: dict, outputs: dict) -> str:
    """A few lines for the terminal."""
    def num(key, spec):
        value = summary.get(key)
        return "n/a" if value is None else format(value, spec)

    lines = [
        f"galaxies {summary['galaxies']:,}: {summary['galaxies_predicted']:,} predicted, "
        f"{summary['galaxies_failed']:,} failed ({summary['partitions_failed']} of {summary['partitions']} "
        f"partitions failed, {summary['galaxies_rejected']} galaxies rejected)",
        f"NMAD {num('nmad', '.4f')}  bias {num('bias', '+.2g')}  outliers {num('outlier_fraction', '.2%')}  "
        f"MAE {num('mae', '.4f')}  MSE {num('mse', '.2e')}  R^2 {num('r2', '.4f')}",
        f"{num('wall_seconds', '.1f')} s wall, {num('galaxies_per_second', ',.0f')} galaxies/s, "
        f"{(summary.get('throughput_bps') or 0) / 1e6:,.1f} Mbit/s",
    ]
    for failure in summary["failed_partitions"][:10]:
        lines.append(f"FAILED {failure['partition']} ({failure['galaxies']} galaxies): {failure['reason']}")
    for rejected in summary["rejected_galaxies"][:10]:
        lines.append(f"REJECTED galaxy {rejected['object_id']} in {rejected['partition']}: {rejected['reason']}")
    lines.append("outputs: " + ", ".join(shown(path) for path in outputs.values()))
    return "\n".join(lines)

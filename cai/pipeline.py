"""The CAI run: Initialize -> one executor per work item -> Summarize.

These three functions are the whole pipeline. The Lambda handlers, the
local process pool and the tests all call them with the same payloads; only
the store differs (an S3 bucket or a folder).

Layout of a run under its ``result_prefix`` (nothing outside it is written,
so two runs with different prefixes never touch each other's files):

    plan.json                     the run's settings and counts
    work_list.json                the Distributed Map's items (ItemReader)
    partials/<partition>.json     per partition: status, reason, metric sums, timings
    predictions/<partition>.safetensors   object_id, z_pred, z_true
    executors/<index>.json        per executor call: duration, memory, for the bill
    summary.json, predictions.csv written by Summarize
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
import uuid
from datetime import datetime, timezone

import numpy as np

from cai import metrics
from cai.errors import CaiError, PayloadError, StoreError
from cai.partitions import GALAXY_BITS, MANIFEST, SUFFIX, decode, sha256
from cai.store import natural_key, open_store

log = logging.getLogger("cai")
# one JSON line per event, for CloudWatch; the CLI shows them only with --verbose
events = logging.getLogger("cai.events")

RUNTIMES = ("onnxruntime", "torch")
DEFAULTS = {
    "batch_size": 256,
    "partitions_per_executor": 1,
    "max_concurrency": 1000,
    "max_partitions": None,
    "runtime": "onnxruntime",
    "threads": None,
    "run_id": None,
}
REQUIRED = ("bucket", "partition_prefix", "model_key", "result_prefix")
# us-east-1 on-demand prices; override with CAI_PRICE_GB_S / CAI_PRICE_REQUEST for other regions
PRICE_GB_S = {"x86_64": 0.0000166667, "arm64": 0.0000133334}
PRICE_REQUEST = 0.20 / 1_000_000
# the state payload is capped at 256 KB: Summarize returns at most this many failure records inline
INLINE_FAILURES = 100


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _log(level, event, **fields):
    events.log(level, json.dumps({"event": event, **fields}, default=str))


def peak_memory_mb() -> float:
    """This process's resident-memory high-water mark, in MiB."""
    # NOTE: VmHWM, not ru_maxrss, which survives exec on Linux: a pool worker or a child spawned
    # from a big process would report that process's peak as its own
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024.0
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def process_age_s() -> float | None:
    """Seconds since this process started (Linux): on a cold Lambda, about its INIT phase, which is billed."""
    try:
        with open("/proc/self/stat") as stat:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as uptime:
            return max(0.0, float(uptime.read().split()[0]) - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def partition_name(key: str, prefix: str) -> str:
    """A partition's name under the run: its key below the prefix, without the suffix."""
    name = key[len(prefix):] if key.startswith(prefix) else key
    return name[: -len(SUFFIX)] if name.endswith(SUFFIX) else name


# --- Initialize ------------------------------------------------------------------------------

def validate_payload(payload) -> dict:
    """Check every field at once; return the run settings with defaults filled in."""
    if not isinstance(payload, dict):
        raise PayloadError([f"the payload must be a JSON object, got {type(payload).__name__}"])
    problems = []
    unknown = sorted(set(payload) - set(REQUIRED) - set(DEFAULTS))
    if unknown:
        problems.append(f"unknown field(s) {unknown}; known fields: {sorted(set(REQUIRED) | set(DEFAULTS))}")
    run = {**DEFAULTS, **{k: v for k, v in payload.items() if k not in unknown}}
    for field in REQUIRED:
        value = payload.get(field)
        if value is None:
            problems.append(f"'{field}' is missing")
        elif not isinstance(value, str) or (field != "partition_prefix" and not value.strip()):
            problems.append(f"'{field}' must be a non-empty string, got {value!r}")

    def integer(field, low, high, optional=False):
        value = run.get(field)
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(f"'{field}' must be an integer from {low} to {high}, got {value!r}")

    integer("batch_size", 1, 8192)
    integer("partitions_per_executor", 1, 1000)
    integer("max_concurrency", 1, 10000)
    integer("max_partitions", 1, 10_000_000, optional=True)
    integer("threads", 1, 64, optional=True)
    if run.get("runtime") not in RUNTIMES:
        problems.append(f"'runtime' must be one of {list(RUNTIMES)}, got {run.get('runtime')!r}")
    prefix, results = payload.get("partition_prefix"), payload.get("result_prefix")
    if isinstance(prefix, str) and isinstance(results, str) and results.strip():
        if not results.endswith("/"):
            run["result_prefix"] = results = results + "/"
        if results.startswith(prefix) and prefix.endswith("/") or results == prefix:
            problems.append(f"'result_prefix' {results!r} lies inside 'partition_prefix' {prefix!r}: "
                            "results would be read back as partitions; choose a prefix outside it")
    if problems:
        raise PayloadError(problems)
    return run


def list_partitions(store, prefix: str) -> list[dict]:
    """Every partition under ``prefix`` (paginated, natural order), with manifest counts where known."""
    objects = list(store.list(prefix))
    manifest = {}
    for obj in objects:
        if obj.key == prefix + MANIFEST or obj.key.endswith("/" + MANIFEST) and obj.key.startswith(prefix):
            for entry in json.loads(store.get(obj.key)).get("partitions", []):
                folder = obj.key[: -len(MANIFEST)]
                manifest[folder + entry["key"]] = entry
    parts = []
    for obj in objects:
        if obj.key.endswith(SUFFIX):
            entry = manifest.get(obj.key, {})
            parts.append({"key": obj.key, "bytes": obj.size, "galaxies": entry.get("galaxies"),
                          "sha256": entry.get("sha256")})
    parts.sort(key=lambda p: natural_key(p["key"]))
    return parts, [o.key for o in objects if not o.key.endswith(SUFFIX) and not o.key.endswith(MANIFEST)]


def find_inputs(store, run: dict) -> list[dict]:
    """The run's partitions, after checking they and the model are in ``store``.

    Raises:
        PayloadError: naming every missing input at once.
    """
    parts, others = list_partitions(store, run["partition_prefix"])
    problems = []
    if not parts:
        hint = ""
        if any(k.endswith(".pt") for k in others):
            hint = "; the prefix holds .pt files: convert them first with `cai partition SRC --out DEST`"
        problems.append(f"no partitions ({SUFFIX}) under {store.url(run['partition_prefix'])}{hint}")
    if not store.exists(run["model_key"]):
        problems.append(f"no model at {store.url(run['model_key'])}; upload it with `cai upload`")
    if problems:
        raise PayloadError(problems)
    return parts


def initialize(payload, store=None) -> dict:
    """Validate the payload, list the partitions, write the work list; return the run plan.

    Nothing is written when the payload or the data is wrong: every problem is named at once.
    """
    run = validate_payload(payload)
    store = store or open_store(run["bucket"])
    parts = find_inputs(store, run)
    if run["max_partitions"]:
        parts = parts[: run["max_partitions"]]
    run["run_id"] = run["run_id"] or f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"
    run["started_at"] = now_iso()
    run["started_unix"] = time.time()
    size = run["partitions_per_executor"]
    work = [{"executor": i // size, "partitions": parts[i:i + size]} for i in range(0, len(parts), size)]
    work_key = run["result_prefix"] + "work_list.json"
    store.put(work_key, json.dumps(work).encode())
    known = [p["galaxies"] for p in parts]
    plan = {
        "run": run,
        "work_list_key": work_key,
        "max_concurrency": run["max_concurrency"],
        "partitions": len(parts),
        "executors": len(work),
        "galaxies": sum(known) if None not in known else None,
    }
    store.put(run["result_prefix"] + "plan.json", json.dumps(plan, indent=1).encode())
    _log(logging.INFO, "run_planned", run_id=run["run_id"], partitions=len(parts), executors=len(work))
    return plan


# --- cosmicExecutor --------------------------------------------------------------------------

_ENGINES: dict = {}


def get_engine(store, run: dict):
    """The model, loaded once per process (Lambda container or pool worker) and reused."""
    key = (store.name, run["model_key"], run["runtime"], run.get("threads"))
    if key not in _ENGINES:
        from cai.model.engine import Engine

        path = store.local_path(run["model_key"])
        _ENGINES.clear()  # one model at a time keeps memory flat in long-lived workers
        _ENGINES[key] = Engine.load(path, runtime=run["runtime"], threads=run.get("threads"))
    return _ENGINES[key]


def _execute_partition(run, part, store, engine, executor, engine_error=None) -> dict:
    prefix, results = run["partition_prefix"], run["result_prefix"]
    name = partition_name(part["key"], prefix)
    record = {"run_id": run["run_id"], "partition": part["key"], "name": name, "executor": executor,
              "status": "failed", "reason": None, "galaxies": part.get("galaxies"), "predicted": 0,
              "rejected": [], "sums": None, "seconds": {}, "bytes": None}
    seconds = record["seconds"]
    started = t = time.perf_counter()
    try:
        if engine_error is not None:
            raise engine_error
        data = store.get(part["key"])
        record["bytes"] = len(data)
        seconds["download"] = time.perf_counter() - t
        t = time.perf_counter()
        if part.get("sha256") and sha256(data) != part["sha256"]:
            raise CaiError(f"partition {part['key']} does not match its manifest checksum (corrupt or replaced)",
                           "write it again with `cai partition` and upload it")
        galaxies = decode(data, part["key"])
        del data
        record["galaxies"] = len(galaxies)
        seconds["decode"] = time.perf_counter() - t
        t = time.perf_counter()
        prediction = engine.predict(galaxies.images, galaxies.magnitudes, batch_size=run["batch_size"])
        seconds["inference"] = time.perf_counter() - t
        t = time.perf_counter()
        z_pred = prediction.redshift.astype(np.float32)
        record["rejected"] = [{"object_id": int(galaxies.object_id[i]), "reason": reason}
                              for i, reason in sorted(prediction.rejected.items())]
        record["predicted"] = len(galaxies) - len(record["rejected"])
        record["sums"] = metrics.partials(z_pred, galaxies.redshifts)
        from safetensors.numpy import save

        store.put(f"{results}predictions/{name}{SUFFIX}", save(
            {"object_id": galaxies.object_id, "z_pred": z_pred, "z_true": galaxies.redshifts.astype(np.float32)},
            metadata={"partition": part["key"], "model_version": str(engine.model_version)}))
        seconds["write"] = time.perf_counter() - t
        record["status"] = "ok"
        record["model_version"] = engine.model_version
    except CaiError as exc:
        record["reason"] = str(exc)
    except Exception as exc:  # one bad partition must not sink the others; the log keeps the traceback
        record["reason"] = f"unexpected {type(exc).__name__}: {exc}"
        log.exception("partition %s failed", part["key"])
    seconds["total"] = time.perf_counter() - started
    record["peak_memory_mb"] = round(peak_memory_mb(), 1)
    store.put(f"{results}partials/{name}.json", json.dumps(record).encode())
    level = logging.INFO if record["status"] == "ok" else logging.ERROR
    _log(level, "partition", run_id=run["run_id"], partition=part["key"], status=record["status"],
         galaxies=record["galaxies"], predicted=record["predicted"], reason=record["reason"],
         seconds={k: round(v, 3) for k, v in seconds.items()}, peak_memory_mb=record["peak_memory_mb"],
         model_version=record.get("model_version"))
    return record


def execute(event: dict, store=None, context=None) -> dict:
    """Predict every partition of one work item; each partition succeeds or fails on its own."""
    started = time.perf_counter()
    run, item = event["run"], event["item"]
    store = store or open_store(run["bucket"])
    executor = item.get("executor", 0)
    cold = not _ENGINES
    # a Lambda container is one process, so its age at the first call is its start-up; a pool
    # worker or the emulator (every "Lambda" in one process) has no such start-up to bill
    on_lambda = bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))
    init_seconds = (process_age_s() or 0.0) if cold and on_lambda else 0.0
    engine, engine_error, load_seconds = None, None, 0.0
    try:
        t = time.perf_counter()
        engine = get_engine(store, run)
        load_seconds = time.perf_counter() - t
    except CaiError as exc:
        engine_error = exc  # every partition of this item fails with the model's error
    records = [_execute_partition(run, part, store, engine, executor, engine_error)
               for part in item["partitions"]]
    duration = time.perf_counter() - started
    memory = getattr(context, "memory_limit_in_mb", None)
    store.put(f"{run['result_prefix']}executors/{executor:06d}.json", json.dumps({
        "executor": executor, "seconds": duration, "model_load_seconds": load_seconds, "cold_start": cold,
        "init_seconds": init_seconds,
        "memory_mb": int(memory) if memory else None,
        "request_id": getattr(context, "aws_request_id", None),
        "partitions": [r["partition"] for r in records], "peak_memory_mb": round(peak_memory_mb(), 1),
    }).encode())
    return {"executor": executor, "ok": sum(r["status"] == "ok" for r in records),
            "failed": [r["partition"] for r in records if r["status"] != "ok"], "seconds": round(duration, 3)}


# --- Summarize -------------------------------------------------------------------------------

def _read_json(store, key):
    try:
        return json.loads(store.get(key))
    except StoreError:
        return None


def _bill(executors: list[dict], architecture: str) -> dict:
    memories = {e["memory_mb"] for e in executors if e.get("memory_mb")}
    if not memories:
        return {"cost_usd": None, "note": "not run on Lambda: no configured memory to bill"}
    price = float(os.environ.get("CAI_PRICE_GB_S", PRICE_GB_S.get(architecture, PRICE_GB_S["x86_64"])))
    request = float(os.environ.get("CAI_PRICE_REQUEST", PRICE_REQUEST))
    # Lambda bills whole milliseconds of *configured* memory, not the memory used, and a cold
    # container's start-up (imports, layer set-up) as well as the call itself
    gb_s = sum(math.ceil((e["seconds"] + e.get("init_seconds", 0.0)) * 1000) / 1000 * (e["memory_mb"] or 0) / 1024
               for e in executors)
    init_s = sum(e.get("init_seconds", 0.0) for e in executors)
    return {"invocations": len(executors), "memory_mb": sorted(memories), "architecture": architecture,
            "gb_seconds": round(gb_s, 3), "init_seconds": round(init_s, 3), "price_per_gb_s": price,
            "cost_usd": round(gb_s * price + len(executors) * request, 6),
            "note": "executor calls only: measured duration, plus each cold container's start-up, "
                    "times configured memory"}


def summarize(plan: dict, store=None) -> dict:
    """Merge every partial into one summary; partitions without a partial are reported failed."""
    run = plan["run"]
    store = store or open_store(run["bucket"])
    results = run["result_prefix"]
    work = json.loads(store.get(plan["work_list_key"]))
    expected = [part for item in work for part in item["partitions"]]
    names = {partition_name(p["key"], run["partition_prefix"]): p for p in expected}
    partials = {}
    for obj in store.list(results + "partials/"):
        name = obj.key[len(results + "partials/"):-len(".json")]
        if name in names:  # a stale partial of an earlier run under this prefix is not this run's
            partials[name] = json.loads(store.get(obj.key))
    executors = [json.loads(store.get(o.key)) for o in store.list(results + "executors/")]

    ok, failed, rejected = [], [], []
    for name, part in names.items():
        record = partials.get(name)
        if record is None:
            failed.append({"partition": part["key"], "galaxies": part.get("galaxies") or 0,
                           "reason": "no result: its executor did not finish (timeout, out of memory or crash); "
                                     "see `sls logs -f cosmicExecutor`"})
        elif record["status"] != "ok":
            failed.append({"partition": part["key"], "galaxies": record.get("galaxies") or 0,
                           "reason": record["reason"]})
        else:
            ok.append(record)
            rejected += [{**r, "partition": part["key"]} for r in record["rejected"]]

    z_pred, z_true, ids = [], [], []
    for record in ok:
        from safetensors.numpy import load

        arrays = load(store.get(f"{results}predictions/{record['name']}{SUFFIX}"))
        ids.append(arrays["object_id"]), z_pred.append(arrays["z_pred"]), z_true.append(arrays["z_true"])
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    z_pred = np.concatenate(z_pred) if z_pred else np.zeros(0, np.float32)
    z_true = np.concatenate(z_true) if z_true else np.zeros(0, np.float32)
    accuracy = metrics.finalize(metrics.merge(r["sums"] for r in ok), metrics.nmad(z_pred, z_true))

    finished = time.time()
    wall = finished - run["started_unix"]
    predicted = sum(r["predicted"] for r in ok)
    in_failed = sum(f["galaxies"] for f in failed)
    times = np.array([r["seconds"]["total"] for r in ok]) if ok else np.zeros(0)
    inference = sum(r["seconds"].get("inference", 0.0) for r in ok)
    summary = {
        "run_id": run["run_id"],
        "model_key": run["model_key"],
        "model_version": next((r.get("model_version") for r in ok), None),
        "runtime": run["runtime"],
        "galaxies": predicted + len(rejected) + in_failed,
        "galaxies_predicted": predicted,
        "galaxies_failed": len(rejected) + in_failed,
        "galaxies_rejected": len(rejected),
        "partitions": len(expected),
        "partitions_failed": len(failed),
        "failed_partitions": failed,
        "rejected_galaxies": rejected,
        **{k: accuracy[k] for k in ("mse", "mae", "bias", "nmad", "outlier_fraction", "r2")},
        "labelled_galaxies": accuracy["labelled"],
        "started_at": run["started_at"],
        "finished_at": now_iso(),
        "wall_seconds": wall,
        "galaxies_per_second": predicted / wall if wall > 0 else None,
        "throughput_bps": predicted * GALAXY_BITS / wall if wall > 0 else None,
        "galaxy_bits": GALAXY_BITS,
        "partition_seconds": ({"min": float(times.min()), "median": float(np.median(times)),
                               "max": float(times.max()), "mean": float(times.mean())} if len(times) else None),
        "inference_seconds_total": inference,
        "inference_galaxies_per_second": predicted / inference if inference > 0 else None,
        "executors": len(executors),
        "peak_memory_mb": max((e.get("peak_memory_mb") or 0 for e in executors), default=None),
        "bytes_read": sum(r.get("bytes") or 0 for r in ok),
        "lambda_bill": _bill(executors, os.environ.get("CAI_ARCHITECTURE", "x86_64")),
        "batch_size": run["batch_size"],
        "outputs": {"summary": results + "summary.json", "predictions_csv": results + "predictions.csv"},
    }
    if plan.get("map_error"):
        summary["map_error"] = plan["map_error"]
    summary = _plain(summary)
    store.put(results + "summary.json", json.dumps(summary, indent=1).encode())
    store.put(results + "predictions.csv", predictions_csv(ids, z_pred, z_true, rejected))
    _log(logging.INFO, "run_summarized", run_id=run["run_id"], galaxies=summary["galaxies"],
         predicted=predicted, failed_partitions=len(failed), wall_seconds=round(wall, 3))
    return _inline(summary)


def _plain(value):
    """JSON-safe copy: numpy scalars to Python, NaN and infinities to null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _inline(summary: dict) -> dict:
    """The summary as a state output: long failure lists are cut (summary.json has them all)."""
    small = dict(summary)
    for key in ("failed_partitions", "rejected_galaxies"):
        if len(small[key]) > INLINE_FAILURES:
            small[key] = small[key][:INLINE_FAILURES]
            small[key + "_truncated"] = True
    return small


def predictions_csv(ids, z_pred, z_true, rejected) -> bytes:
    """object_id, z_pred, z_true; rejected galaxies keep their row with an empty z_pred and the reason."""
    lines = ["object_id,z_pred,z_true,flag"]
    reasons = {r["object_id"]: r["reason"] for r in rejected}
    for i, p, t in zip(ids.tolist(), z_pred.tolist(), z_true.tolist()):
        flag = reasons.get(i, "")
        lines.append(f"{i},{'' if math.isnan(p) else f'{p:.6f}'},{'' if math.isnan(t) else f'{t:.6f}'},"
                     f"{json.dumps(flag) if flag else ''}")
    return ("\n".join(lines) + "\n").encode()

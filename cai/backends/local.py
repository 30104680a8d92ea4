"""``--backend local``: the executors as a pool of worker processes on this machine.

The same three pipeline functions as on Lambda, over a folder instead of a
bucket. Each worker loads the model once and keeps it; partitions stream
through it one at a time, so peak memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed

from cai import pipeline
from cai.store import LocalStore


def _work(event: dict) -> dict:
    return pipeline.execute(event, LocalStore("/"))


def _quiet_worker(threads: int):
    # workers share the cores: each runtime gets its slice, not all of them
    os.environ["OMP_NUM_THREADS"] = str(threads)


def run(payload: dict, workers: int | None = None, progress: bool = True) -> dict:
    """Initialize, execute every work item in ``workers`` processes, Summarize; return the summary."""
    store = LocalStore("/")
    cores = os.cpu_count() or 1
    workers = max(1, workers or cores)
    payload = {"threads": max(1, cores // workers), **payload}
    plan = pipeline.initialize(payload, store)
    work = json.loads(store.get(plan["work_list_key"]))
    events = [{"run": plan["run"], "item": item} for item in work]
    bar = _progress(plan["partitions"], progress)
    if workers == 1 or len(events) == 1:
        for event in events:
            result = _work(event)
            bar.update(result["ok"] + len(result["failed"]))
    else:
        # spawn, not fork: a forked copy of a threaded runtime can deadlock
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(events)), mp_context=context,
                                 initializer=_quiet_worker, initargs=(payload["threads"],)) as pool:
            for done in as_completed([pool.submit(_work, e) for e in events]):
                result = done.result()
                bar.update(result["ok"] + len(result["failed"]))
    bar.close()
    return pipeline.summarize(plan, store)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    shown = enabled and (sys.stderr.isatty() or os.environ.get("CAI_PROGRESS") == "1")
    return tqdm(total=total, unit="partition", desc="cai run", disable=not shown, file=sys.stderr)

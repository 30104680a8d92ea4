"""``cai upload`` and ``cai payload``: drive a deployed stack without the AWS console.

``upload`` puts partitions and model files in the stack's bucket; ``payload``
writes the state machine input for ``npx sls invoke stepf --name cai --path
payload.json``, checked as Initialize will check it. Both find the bucket in
the stack's outputs (``BucketName``) unless it is given, and reuse the steps
of ``cai run --backend aws`` (cai.backends.aws), so the three agree on keys.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cai import pipeline
from cai.backends import aws
from cai.errors import InputError, StoreError
from cai.store import S3Store

log = logging.getLogger("cai")

# weights or an exported graph; everything else is data (partition folders or source files)
MODEL_SUFFIXES = (".onnx", ".safetensors")
# what the last `cai upload` put in the bucket, so `cai payload` needs no keys copied by hand
LAST_UPLOAD = "uploads/last.json"


def bucket_store(stack: str, region: str | None = None, profile: str | None = None,
                 bucket: str | None = None) -> S3Store:
    """The stack's bucket (``bucket`` wins over the stack's ``BucketName`` output)."""
    bucket, _ = aws.resolve_stack(stack, region, profile, bucket, need_state_machine=False)
    return S3Store(bucket, aws.session(region, profile).client("s3"))


def split_paths(paths: list[str]) -> tuple[list[str], list[str]]:
    """(data, models): model files by suffix; folders and other files are the dataset."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise InputError(f"no such file or folder: {', '.join(missing)}")
    models = [p for p in paths if Path(p).is_file() and Path(p).suffix in MODEL_SUFFIXES]
    return [p for p in paths if p not in models], models


def upload(paths: list[str], stack: str, region: str | None = None, profile: str | None = None,
           bucket: str | None = None, prefix: str | None = None, runtime: str = "onnxruntime",
           size_mb: float = 25, workdir: str | Path = "results") -> dict:
    """Upload a dataset (partitioned first when it is not yet) and model files; return their keys.

    Args:
        paths: partition folders or source files (one dataset, under ``prefix``), and
            ``.onnx``/``.safetensors`` model files (under ``models/``; weights are exported to
            ONNX first for the onnxruntime runtime, which the Lambda cannot do without torch).
        prefix: the dataset's prefix in the bucket (default ``partitions/<UTC time>/``).
        workdir: where source files are partitioned before upload.
    """
    data, models = split_paths(paths)
    store = bucket_store(stack, region, profile, bucket)
    uploaded = {"bucket": store.bucket, "partition_prefix": None,
                "model_keys": [aws.upload_model(m, store, runtime) for m in models]}
    if data:
        uploaded["partition_prefix"] = aws.upload_partitions(data, store, workdir, size_mb, prefix)

    # what is not uploaded this time stays as the last upload left it
    last = last_upload(store)
    if uploaded["partition_prefix"]:
        last["partition_prefix"] = uploaded["partition_prefix"]
    if uploaded["model_keys"]:
        last["model_key"] = uploaded["model_keys"][-1]
    store.put(LAST_UPLOAD, json.dumps(last, indent=1).encode())
    return uploaded


def last_upload(store: S3Store) -> dict:
    """``partition_prefix`` and ``model_key`` of the last ``cai upload`` to this bucket, where known."""
    try:
        return json.loads(store.get(LAST_UPLOAD))
    except StoreError:
        return {}


def payload(stack: str, partition_prefix: str | None = None, model_key: str | None = None,
            region: str | None = None, profile: str | None = None, bucket: str | None = None, result_prefix: str | None = None,
            settings: dict | None = None, check: bool = True) -> tuple[dict, int | None]:
    """The state machine input for a deployed stack, and how many partitions it will run.

    ``partition_prefix`` and ``model_key`` default to the last ``cai upload`` to the bucket.
    The payload passes the checks Initialize makes; with ``check`` the partitions and the model
    are also looked up in the bucket, so a typo fails here and not after a deploy-and-invoke.

    Raises:
        PayloadError: every problem with the fields or the bucket's contents, at once.
    """
    store = bucket_store(stack, region, profile, bucket)
    if partition_prefix is None or model_key is None:
        last = last_upload(store)
        partition_prefix = last.get("partition_prefix") if partition_prefix is None else partition_prefix
        model_key = model_key or last.get("model_key")
        unknown = [flag for flag, value in (("--partition-prefix", partition_prefix), ("--model-key", model_key))
                   if value is None]
        if unknown:
            raise InputError(f"no {' or '.join(unknown)} given, and no earlier `cai upload` to s3://{store.bucket} "
                             "recorded one", "upload the data and model with `cai upload`, or pass them")
    body = aws.build_payload(store.bucket, partition_prefix, model_key, result_prefix, settings)
    run = pipeline.validate_payload(body)
    body["result_prefix"] = run["result_prefix"]  # with the trailing / Initialize adds
    if not check:
        return body, None
    parts = pipeline.find_inputs(store, run)
    return body, len(parts[: run["max_partitions"]] if run["max_partitions"] else parts)

"""``--backend aws``: start the deployed state machine, follow it, fetch the results.

The stack (``sls deploy``) publishes its bucket and state machine as
CloudFormation outputs; both can also be given directly. Local data and
models are uploaded first (``cai upload`` does the same on its own), so one
command takes a folder on a laptop to predictions computed on Lambda.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timezone
from pathlib import Path

from cai.errors import CaiError, StoreError
from cai.store import S3Store, split_location

log = logging.getLogger("cai")

OUTPUT_BUCKET = "BucketName"
OUTPUT_STATE_MACHINE = "StateMachineArn"


class AwsRunError(CaiError):
    """The deployed state machine could not be found, started or did not succeed."""


def session(region: str | None = None, profile: str | None = None):
    import boto3

    return boto3.Session(region_name=region, profile_name=profile)


def stack_outputs(stack: str, region: str | None = None, profile: str | None = None) -> dict:
    """The deployed stack's outputs by key (``BucketName``, ``StateMachineArn``, ...)."""
    client = session(region, profile).client("cloudformation")
    try:
        stacks = client.describe_stacks(StackName=stack)["Stacks"]
    except Exception as exc:
        raise AwsRunError(f"cannot read stack {stack!r}: {exc}", _stack_hint(exc)) from exc
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def _stack_hint(exc: Exception) -> str:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError, NoRegionError

    if isinstance(exc, NoCredentialsError):
        return "configure AWS credentials: `aws configure`, or AWS_PROFILE / --profile"
    if isinstance(exc, NoRegionError):
        return "give --region (or set AWS_REGION)"
    if isinstance(exc, EndpointConnectionError):
        return "AWS cannot be reached: check --region and the network"
    return "deploy it with `npx sls deploy`, or give --stack and --region of your deployment"


def upload_folder(folder: Path, store: S3Store, prefix: str) -> int:
    """Upload every file below ``folder`` to ``prefix``; return the number of files."""
    from concurrent.futures import ThreadPoolExecutor

    files = [p for p in sorted(Path(folder).rglob("*")) if p.is_file() and not p.name.startswith(".")]
    with ThreadPoolExecutor(8) as pool:  # partitions are tens of MB: a few in flight fill the link
        list(pool.map(lambda p: store.upload(p, prefix + p.relative_to(folder).as_posix()), files))
    return len(files)


def follow(sfn, execution_arn: str, poll_s: float = 5.0, timeout_s: float | None = None) -> dict:
    """Poll an execution until it ends; log the Map's progress; return describe_execution's answer."""
    started = time.monotonic()
    last = None
    while True:
        state = sfn.describe_execution(executionArn=execution_arn)
        if state["status"] != "RUNNING":
            return state
        try:
            runs = sfn.list_map_runs(executionArn=execution_arn).get("mapRuns", [])
            if runs:
                counts = sfn.describe_map_run(mapRunArn=runs[0]["mapRunArn"])["itemCounts"]
                progress = f"{counts['succeeded']}/{counts['total']} work items done, {counts['failed']} failed"
                if progress != last:
                    log.info(progress)
                    last = progress
        except Exception:  # progress is a courtesy; the execution's status is what counts
            pass
        if timeout_s and time.monotonic() - started > timeout_s:
            raise AwsRunError(f"execution {execution_arn} still running after {timeout_s:.0f} s",
                              "it goes on in AWS; follow it in the console or with `aws stepfunctions`")
        time.sleep(poll_s)


def stamp() -> str:
    """UTC time to the second: names a run's prefixes and execution."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"


def resolve_stack(stack: str, region: str | None = None, profile: str | None = None,
                  bucket: str | None = None, state_machine_arn: str | None = None,
                  need_state_machine: bool = True) -> tuple[str, str | None]:
    """The bucket and state machine ARN: as given, else from the stack's outputs."""
    if bucket and (state_machine_arn or not need_state_machine):
        return bucket, state_machine_arn
    outputs = stack_outputs(stack, region, profile)
    bucket = bucket or outputs.get(OUTPUT_BUCKET)
    state_machine_arn = state_machine_arn or outputs.get(OUTPUT_STATE_MACHINE)
    if not bucket or (need_state_machine and not state_machine_arn):
        raise AwsRunError(f"stack {stack!r} has no {OUTPUT_BUCKET}/{OUTPUT_STATE_MACHINE} outputs",
                          "is it a CAI stack? deploy with `npx sls deploy`")
    return bucket, state_machine_arn


def upload_partitions(data: list[str], store: S3Store, workdir: str | Path, size_mb: float,
                      prefix: str | None = None) -> str:
    """Partition ``data`` if needed and upload it (an ``s3://`` prefix in the bucket is used as is).

    Returns the partition prefix in the bucket.
    """
    from cai.run import prepare_partitions

    if len(data) == 1 and data[0].startswith("s3://"):
        data_bucket, partition_prefix = split_location(data[0])
        if data_bucket != store.bucket:
            raise AwsRunError(f"{data[0]} is not in the stack's bucket {store.bucket}",
                              "the functions may read only their own bucket: `cai upload` your partitions there")
        return partition_prefix if partition_prefix.endswith("/") else partition_prefix + "/"
    folder = prepare_partitions(data, Path(workdir), size_mb)
    partition_prefix = prefix or f"partitions/{stamp()}/"
    partition_prefix = partition_prefix if partition_prefix.endswith("/") else partition_prefix + "/"
    log.info("uploaded %d files to s3://%s/%s", upload_folder(folder, store, partition_prefix),
             store.bucket, partition_prefix)
    return partition_prefix


def upload_model(model: str | None, store: S3Store, runtime: str = "onnxruntime",
                 prefix: str = "models/") -> str:
    """The model's key in the bucket: an ``s3://`` one as is, else the file the runtime loads, uploaded once
    under ``models/<sha256 prefix>/<name>``.

    Weights are exported to ONNX here for the onnxruntime runtime, since the Lambda has no torch to do it.
    """
    from cai.run import prepare_model

    if model and str(model).startswith("s3://"):
        return split_location(str(model))[1]
    from cai.model.weights import file_sha256

    path = prepare_model(model, runtime)
    # keyed by content: changed weights under the same file name get a new key, so neither this
    # bucket nor a warm executor (which caches the model by key in /tmp) can serve the old ones
    model_key = f"{prefix}{file_sha256(path)[:16]}/{path.name}"
    if not store.exists(model_key):
        store.upload(path, model_key)
        log.info("uploaded %s to s3://%s/%s", path, store.bucket, model_key)
    return model_key


def build_payload(bucket: str, partition_prefix: str, model_key: str, result_prefix: str | None = None,
                  settings: dict | None = None) -> dict:
    """The state machine's input, as Initialize reads it; settings left None take its defaults."""
    return {"bucket": bucket, "partition_prefix": partition_prefix, "model_key": model_key,
            "result_prefix": result_prefix or f"runs/{stamp()}/",
            **{k: v for k, v in (settings or {}).items() if v is not None}}


def run(data=None, model=None, settings=None, stack: str = "cai-dev", region: str | None = None,
        profile: str | None = None, bucket: str | None = None, state_machine_arn: str | None = None,
        result_prefix: str | None = None, workdir: str | Path = "results", size_mb: float = 25,
        poll_s: float = 5.0, timeout_s: float | None = None):
    """Run on the deployed stack; return (summary, predictions.csv bytes)."""
    from cai.run import DEFAULT_DATA

    settings = dict(settings or {})
    bucket, state_machine_arn = resolve_stack(stack, region, profile, bucket, state_machine_arn)
    aws = session(region, profile)
    store = S3Store(bucket, aws.client("s3"))

    partition_prefix = upload_partitions(data or [str(DEFAULT_DATA)], store, workdir, size_mb)
    model_key = upload_model(model, store, settings.get("runtime", "onnxruntime"))
    payload = build_payload(bucket, partition_prefix, model_key, result_prefix, settings)
    sfn = aws.client("stepfunctions")
    execution = sfn.start_execution(stateMachineArn=state_machine_arn, name=f"cai-{stamp()}",
                                    input=json.dumps(payload))["executionArn"]
    log.info("started %s", execution)
    state = follow(sfn, execution, poll_s=poll_s, timeout_s=timeout_s)
    if state["status"] != "SUCCEEDED":
        raise AwsRunError(f"execution {state['status']}: {state.get('error', '')} {state.get('cause', '')}".strip(),
                          "see `npx sls logs -f initialize` / `-f cosmicExecutor` / `-f summarize`")
    results = payload["result_prefix"]
    try:
        summary = json.loads(store.get(results + "summary.json"))
        csv_bytes = store.get(results + "predictions.csv")
    except StoreError as exc:
        raise AwsRunError(f"the run succeeded but its results are missing: {exc}") from exc
    return summary, csv_bytes

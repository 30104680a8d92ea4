"""The real statemachine/cai.asl.json on moto, with toy handlers standing in for the real ones.

The toys keep the real contract: Initialize writes a JSON work list to S3 and
returns the plan, each executor gets {"run", "item"} and writes one object,
Summarize gets the plan (plus "map_error" when the Map failed).
"""

import json
import os
import threading
import time

import boto3
import pytest

from cai.backends.emulated import EmulatedAWS, EmulatorError, run_state_machine

BUCKET = "cai-emulator-test"
ITEMS = 5
WAIT_S = 30


class ToyPayloadError(Exception):
    """Stands in for cai.errors.PayloadError, which the real Initialize raises."""


class Toys:
    """Three toy handlers and what they saw; ``fail_item`` makes one executor raise."""

    def __init__(self, fail_item=None, reject=False, work_list_key="runs/t/work.json", sleep_s=0.3):
        self.fail_item, self.reject = fail_item, reject
        self.work_list_key, self.sleep_s = work_list_key, sleep_s
        self.lock = threading.Lock()
        self.running = self.peak = 0
        self.contexts = []

    def handlers(self):
        return {"initialize": self.initialize, "cosmicExecutor": self.execute, "summarize": self.summarize}

    def initialize(self, event, context):
        if self.reject:
            raise ToyPayloadError("bad run payload: partitions_prefix is missing")
        s3 = boto3.client("s3")  # no endpoint given: it must come from the environment, as on Lambda
        work = [{"partition": f"p{i:03d}"} for i in range(event["items"])]
        s3.put_object(Bucket=BUCKET, Key="runs/t/work.json", Body=json.dumps(work))
        return {"run": {"bucket": BUCKET, "result_prefix": "runs/t/partials/"},
                "work_list_key": self.work_list_key, "max_concurrency": event["max_concurrency"]}

    def execute(self, event, context):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.contexts.append(context)
        try:
            time.sleep(self.sleep_s)  # long enough for the Map's workers to overlap
            partition = event["item"]["partition"]
            if partition == self.fail_item:
                raise ValueError(f"corrupt partition {partition}")
            run = event["run"]
            boto3.client("s3").put_object(Bucket=run["bucket"], Key=f"{run['result_prefix']}{partition}.json",
                                          Body=json.dumps({"partition": partition, "n": 1}))
            return {"partition": partition}
        finally:
            with self.lock:
                self.running -= 1

    def summarize(self, event, context):
        run = event["run"]
        listed = boto3.client("s3").list_objects_v2(Bucket=run["bucket"], Prefix=run["result_prefix"])
        keys = sorted(obj["Key"] for obj in listed.get("Contents", []))
        return {"partials": len(keys), "keys": keys, "map_error": event.get("map_error")}


def test_emulated_run_executes_the_real_asl_end_to_end():
    # GIVEN toy handlers, a run payload uploaded the way the pipeline backend will, MaxConcurrency 2
    toys = Toys()
    uploaded = []

    def upload(aws):
        aws.s3.put_object(Bucket=BUCKET, Key="inputs/model.onnx", Body=b"weights")
        uploaded.append(aws.endpoint_url)

    def download(aws):
        listed = aws.s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/t/partials/")
        written = aws.s3.list_objects_v2(Bucket=BUCKET, Prefix="map-runs/").get("Contents", [])
        map_runs.extend(obj["Key"] for obj in written)
        return {obj["Key"]: json.loads(aws.s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
                for obj in listed["Contents"]}

    map_runs = []

    # WHEN the real state machine runs
    run = run_state_machine({"items": ITEMS, "max_concurrency": 2}, toys.handlers(), buckets=[BUCKET],
                            upload=upload, download=download, timeout_s=WAIT_S, memory_mb=3008)

    # THEN every item wrote its object, Summarize counted them all, and the Map never ran more than 2
    assert run.succeeded, run.failure
    assert uploaded and uploaded[0].startswith("http://127.0.0.1:")
    expected = [f"runs/t/partials/p{i:03d}.json" for i in range(ITEMS)]
    assert sorted(run.downloaded) == expected
    assert run.output == {"partials": ITEMS, "keys": expected, "map_error": None}
    assert toys.peak == 2
    # the Map's ResultWriter wrote to the stack's bucket (moto writes the manifest only)
    assert len(map_runs) == 1 and map_runs[0].startswith("map-runs/") and map_runs[0].endswith("/manifest.json")
    assert run.peak_concurrency == {"initialize": 1, "cosmicExecutor": 2, "summarize": 1}
    assert [i.function_name for i in run.invocations].count("cosmicExecutor") == ITEMS
    assert all(i.error_type is None for i in run.invocations)

    # and each executor saw a Lambda-like context
    context = toys.contexts[0]
    assert context.function_name == "cosmicExecutor"
    assert context.memory_limit_in_mb == "3008"  # a string, as in the real Python runtime
    assert 0 < context.get_remaining_time_in_millis() <= 900_000
    assert context.invoked_function_arn.endswith(":function:cosmicExecutor")
    assert len({c.aws_request_id for c in toys.contexts}) == ITEMS


def test_emulated_map_tolerates_a_failing_item_and_still_summarizes():
    # GIVEN an executor that raises for one partition (ToleratedFailurePercentage is 100)
    toys = Toys(fail_item="p002", sleep_s=0.05)
    with EmulatedAWS(toys.handlers(), buckets=[BUCKET]) as aws:
        # WHEN the run executes
        status, summary = aws.wait(aws.start({"items": ITEMS, "max_concurrency": 0}), timeout_s=WAIT_S)
        failed = [i for i in aws.invocations if i.error_type]

    # THEN the Map succeeds without that item and Summarize sees the other four
    assert status == "SUCCEEDED", summary
    assert summary["partials"] == ITEMS - 1
    assert "runs/t/partials/p002.json" not in summary["keys"]
    assert summary["map_error"] is None
    assert [(i.function_name, i.error_type, i.error_message) for i in failed] == [
        ("cosmicExecutor", "ValueError", "corrupt partition p002")]


def test_emulated_initialize_error_fails_the_execution_at_run_rejected():
    # GIVEN an Initialize that refuses the payload
    toys = Toys(reject=True)
    with EmulatedAWS(toys.handlers(), buckets=[BUCKET]) as aws:
        # WHEN the run starts
        status, failure = aws.wait(aws.start({"items": ITEMS, "max_concurrency": 2}), timeout_s=WAIT_S)
        called = [i.function_name for i in aws.invocations]

    # THEN the execution fails at RunRejected, Initialize's exception surfaces, nothing else ran
    assert status == "FAILED"
    assert failure["error"] == "CAI.RunRejected"
    assert failure["failed_state"] == "RunRejected"
    [task] = failure["task_failures"]
    assert task["state"] == "Initialize"
    assert task["error"] == "ToyPayloadError"  # the exception's class, as Lambda reports it
    cause = json.loads(task["cause"])  # Lambda's error payload, as Step Functions shows it
    assert cause["errorType"] == "ToyPayloadError"
    assert cause["errorMessage"] == "bad run payload: partitions_prefix is missing"
    assert called == ["initialize"]


def test_emulated_unreadable_work_list_reaches_summarize_as_map_error_then_runs_again():
    # GIVEN an Initialize whose plan points at a work list that does not exist
    toys = Toys(work_list_key="runs/t/missing.json", sleep_s=0)
    with EmulatedAWS(toys.handlers(), buckets=[BUCKET]) as aws:
        # WHEN the run executes
        status, summary = aws.wait(aws.start({"items": 2, "max_concurrency": 2}), timeout_s=WAIT_S)

        # THEN the Map's Catch hands the error to Summarize, which still runs
        assert status == "SUCCEEDED", summary
        assert summary["partials"] == 0
        assert "NoSuchKey" in summary["map_error"]["Cause"]

        # and a second execution on the same machine works (moto issue 10077 is worked around)
        toys.work_list_key = "runs/t/work.json"
        status, summary = aws.wait(aws.start({"items": 2, "max_concurrency": 2}), timeout_s=WAIT_S)
        assert status == "SUCCEEDED", summary
        assert summary["partials"] == 2


def test_emulated_aws_is_exclusive_and_restores_the_environment(monkeypatch):
    # GIVEN a shell aimed at some other endpoint and profile
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://elsewhere.invalid")
    monkeypatch.setenv("AWS_PROFILE", "production")
    before = dict(os.environ)
    toys = Toys()

    with EmulatedAWS(toys.handlers()) as aws:
        # WHILE one runs: S3 goes to moto, no profile applies, and a second emulator is refused
        assert os.environ["AWS_ENDPOINT_URL_S3"] == aws.endpoint_url
        assert "AWS_PROFILE" not in os.environ
        with pytest.raises(EmulatorError, match="already running"):
            with EmulatedAWS(toys.handlers()):
                pass

    # THEN everything is as before
    assert dict(os.environ) == before


def test_emulated_aws_rejects_a_definition_naming_a_missing_handler(tmp_path):
    asl = tmp_path / "one.asl.json"
    asl.write_text(json.dumps({"StartAt": "A", "States": {"A": {
        "Type": "Task", "Resource": "arn:aws:states:::lambda:invoke",
        "Parameters": {"FunctionName": "${OtherFunctionArn}", "Payload.$": "$"}, "End": True}}}))
    with pytest.raises(EmulatorError, match="OtherFunctionArn"):
        with EmulatedAWS(Toys().handlers(), asl_path=asl):
            pass

"""Initialize: payload validation and partition listing, against moto's S3."""

import json

import boto3
import pytest
from moto import mock_aws

from cai import pipeline
from cai.errors import PayloadError, StoreError
from cai.store import S3Store

PAYLOAD = {"bucket": "survey", "partition_prefix": "parts/", "model_key": "models/m.onnx",
           "result_prefix": "runs/a/"}


@pytest.fixture
def s3(monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="survey")
        client.put_object(Bucket="survey", Key="models/m.onnx", Body=b"x")
        yield client


def test_every_payload_problem_is_named_at_once():
    with pytest.raises(PayloadError) as err:
        pipeline.validate_payload({"bucket": "", "model_key": 3, "result_prefix": "r/", "batch_size": 0,
                                   "runtime": "tensorflow", "colour": "red"})
    problems = err.value.problems
    text = " ".join(problems)
    for expected in ("'bucket' must be a non-empty string", "'partition_prefix' is missing",
                     "'model_key' must be a non-empty string", "'batch_size' must be an integer",
                     "'runtime' must be one of", "unknown field(s) ['colour']"):
        assert expected in text
    assert len(problems) == 6


def test_results_inside_the_partition_prefix_are_refused():
    with pytest.raises(PayloadError, match="inside 'partition_prefix'"):
        pipeline.validate_payload({**PAYLOAD, "result_prefix": "parts/run1/"})


def test_listing_is_paginated_and_in_natural_order(s3):
    # 1,005 keys: the prototype's unpaginated listing stopped at 1,000 and sorted 1, 10, 100
    for i in range(1, 1006):
        s3.put_object(Bucket="survey", Key=f"parts/part-{i}.safetensors", Body=b"")
    plan = pipeline.initialize({**PAYLOAD, "partitions_per_executor": 2}, S3Store("survey", s3))
    assert plan["partitions"] == 1005 and plan["executors"] == 503
    work = json.loads(s3.get_object(Bucket="survey", Key=plan["work_list_key"])["Body"].read())
    keys = [p["key"] for item in work for p in item["partitions"]]
    assert keys == [f"parts/part-{i}.safetensors" for i in range(1, 1006)]
    assert plan["work_list_key"].startswith("runs/a/")


def test_max_partitions_limits_the_run(s3):
    for i in range(1, 6):
        s3.put_object(Bucket="survey", Key=f"parts/part-{i}.safetensors", Body=b"")
    plan = pipeline.initialize({**PAYLOAD, "max_partitions": 3}, S3Store("survey", s3))
    assert plan["partitions"] == 3


def test_empty_prefix_and_missing_model_start_nothing(s3):
    with pytest.raises(PayloadError) as err:
        pipeline.initialize({**PAYLOAD, "model_key": "models/none.onnx"}, S3Store("survey", s3))
    text = str(err.value)
    assert "no partitions (.safetensors) under s3://survey/parts/" in text
    assert "no model at s3://survey/models/none.onnx" in text
    assert "Contents" not in s3.list_objects_v2(Bucket="survey", Prefix="runs/")  # nothing written


def test_authors_pt_files_get_a_conversion_hint(s3):
    s3.put_object(Bucket="survey", Key="parts/1.pt", Body=b"")
    with pytest.raises(PayloadError, match="convert them first with `cai partition"):
        pipeline.initialize(PAYLOAD, S3Store("survey", s3))


def test_unknown_bucket_is_a_named_error(s3):
    with pytest.raises(StoreError, match="NoSuchBucket"):
        pipeline.initialize({**PAYLOAD, "bucket": "nope"}, S3Store("nope", s3))

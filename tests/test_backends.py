"""The emulated backend: the real state machine on moto with the real handlers, against the local backend."""

import json

import numpy as np
import pytest

from cai.backends import emulated, local
from cai.partitions import write_partitions
from cai.store import LocalStore

SETTINGS = {"batch_size": 32}


@pytest.fixture(scope="module")
def partitions(tmp_path_factory, request):
    """Five partitions of real SDSS cutouts with made-up redshifts, one of them truncated."""
    folder = tmp_path_factory.mktemp("parts")
    src = folder.parent / "survey.npz"
    with np.load(request.config.rootpath / "data" / "sdss_dr17_galaxies_32x32.npz") as npz:
        images, mags = npz["images"][:200], npz["aperture_mag"][:200]
    z = np.random.default_rng(3).uniform(0.02, 0.3, len(images)).astype(np.float32)
    np.savez(src, images=images, magnitudes=mags, redshifts=z, object_id=np.arange(1, 201) * 1000)
    write_partitions([str(src)], LocalStore(folder), "", size_mb=0, galaxies_per_part=40)
    store = LocalStore(folder)
    store.put("part-00004.safetensors", store.get("part-00004.safetensors")[:3000])
    return folder


def test_emulated_run_matches_local_run(partitions, onnx_model, tmp_path):
    summary, csv = emulated.run_pipeline(partitions, onnx_model, SETTINGS)
    local_summary = local.run({"bucket": "/", "partition_prefix": f"{partitions}/", "model_key": str(onnx_model),
                               "result_prefix": f"{tmp_path}/run/", **SETTINGS}, workers=2, progress=False)
    local_csv = (tmp_path / "run" / "predictions.csv").read_bytes()

    assert csv == local_csv  # identical predictions, row for row
    for key in ("galaxies", "galaxies_predicted", "galaxies_failed", "galaxies_rejected", "partitions",
                "partitions_failed", "mse", "mae", "bias", "nmad", "outlier_fraction", "r2"):
        assert summary[key] == local_summary[key], key
    assert summary["galaxies"] == 200 == summary["galaxies_predicted"] + summary["galaxies_failed"]
    (failed,) = summary["failed_partitions"]
    assert failed["partition"] == "partitions/part-00004.safetensors" and failed["galaxies"] == 40
    assert "checksum" in failed["reason"]
    # on "Lambda" the bill is computed from configured memory; locally there is none to bill
    assert summary["lambda_bill"]["memory_mb"] == [10240] and summary["lambda_bill"]["cost_usd"] > 0
    assert local_summary["lambda_bill"]["cost_usd"] is None


def test_bad_payload_is_rejected_before_anything_runs(partitions, onnx_model):
    with pytest.raises(emulated.EmulatorError) as err:
        emulated.run_pipeline(partitions, onnx_model, {"batch_size": 0, "runtime": "jax"})
    text = str(err.value)
    assert "RunRejected" in text or "Initialize" in text
    assert "'batch_size' must be an integer" in text and "'runtime' must be one of" in text


def test_two_runs_at_once_keep_to_their_own_prefixes(partitions, onnx_model):
    handlers = emulated.real_handlers()
    with emulated.EmulatedAWS(handlers, buckets=["survey"]) as aws:
        for path in sorted(partitions.iterdir()):
            aws.s3.upload_file(str(path), "survey", f"parts/{path.name}")
        aws.s3.upload_file(str(onnx_model), "survey", "models/m.onnx")
        base = {"bucket": "survey", "partition_prefix": "parts/", "model_key": "models/m.onnx", "batch_size": 64}
        arns = [aws.start({**base, "result_prefix": "runs/a/"}),
                aws.start({**base, "result_prefix": "runs/b/", "max_partitions": 2})]
        outcomes = [aws.wait(arn, timeout_s=600) for arn in arns]

        assert [status for status, _ in outcomes] == ["SUCCEEDED", "SUCCEEDED"]
        a, b = (detail for _, detail in outcomes)
        assert (a["partitions"], b["partitions"]) == (5, 2)
        keys = [o["Key"] for page in aws.s3.get_paginator("list_objects_v2").paginate(Bucket="survey", Prefix="runs/")
                for o in page.get("Contents", [])]
        summary_b = json.loads(aws.s3.get_object(Bucket="survey", Key="runs/b/summary.json")["Body"].read())
    assert all(k.startswith(("runs/a/", "runs/b/")) for k in keys)
    assert len([k for k in keys if k.startswith("runs/a/partials/")]) == 5
    assert len([k for k in keys if k.startswith("runs/b/partials/")]) == 2
    assert summary_b["galaxies"] == 80 and summary_b["run_id"] != a["run_id"]


def test_aws_backend_uploads_starts_follows_and_downloads(partitions, onnx_model, tmp_path):
    """The aws backend against the emulated stack: same boto3 calls as on AWS, moto answering."""
    from cai.backends import aws

    with emulated.EmulatedAWS(emulated.real_handlers(), buckets=["stack-bucket"]) as emu:
        summary, csv = aws.run(data=[str(partitions)], model=str(onnx_model), settings=SETTINGS,
                               bucket="stack-bucket", state_machine_arn=emu.state_machine_arn,
                               workdir=tmp_path, poll_s=0.2, timeout_s=600, result_prefix="runs/x/")
        keys = {o["Key"] for o in emu.s3.list_objects_v2(Bucket="stack-bucket")["Contents"]}
    assert summary["galaxies"] == 200 and summary["partitions_failed"] == 1
    assert csv.startswith(b"object_id,z_pred,z_true,flag\n") and csv.count(b"\n") == 161
    assert any(k.startswith("models/") and k.endswith(f"/{onnx_model.name}") for k in keys) and "runs/x/summary.json" in keys


def test_aws_backend_names_a_missing_stack(monkeypatch):
    from moto import mock_aws

    from cai.backends import aws

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws(), pytest.raises(aws.AwsRunError, match="cannot read stack 'cai-nowhere'"):
        aws.run(stack="cai-nowhere", region="eu-west-1")

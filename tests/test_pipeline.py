"""The pipeline end to end on the local backend: predictions, merged metrics, failures, accounting."""

import json
from pathlib import Path

import numpy as np
import pytest

from cai import metrics, pipeline
from cai.backends import local
from cai.model.engine import Engine
from cai.partitions import write_partitions
from cai.paths import SDSS_CUTOUTS as CUTOUTS
from cai.store import LocalStore


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Real SDSS cutouts with their magnitudes; redshifts made up (these objects have none)."""
    folder = tmp_path_factory.mktemp("src")
    with np.load(CUTOUTS) as npz:
        images, mags = npz["images"][:150], npz["aperture_mag"][:150]
    rng = np.random.default_rng(1)
    z = rng.uniform(0.02, 0.3, len(images)).astype(np.float32)
    mags = mags.copy()
    mags[7, 2] = np.nan  # one galaxy cannot be predicted: it must be listed, not lost
    np.savez(folder / "survey.npz", images=images, magnitudes=mags, redshifts=z,
             object_id=np.arange(5000, 5000 + len(images)))
    return folder / "survey.npz"


def payload(partitions: Path, model: Path, results: Path, **extra):
    return {"bucket": "/", "partition_prefix": f"{partitions}/", "model_key": str(model),
            "result_prefix": f"{results}/", "batch_size": 16, **extra}


def make_partitions(dataset, folder: Path, per_part=40):
    return write_partitions([str(dataset)], LocalStore(folder), "", size_mb=0, galaxies_per_part=per_part)


def test_local_run_predicts_every_galaxy_and_merges_metrics(dataset, onnx_model, tmp_path):
    parts = tmp_path / "parts"
    manifest = make_partitions(dataset, parts)
    assert len(manifest["partitions"]) == 4

    summary = local.run(payload(parts, onnx_model, tmp_path / "run"), workers=2, progress=False)

    with np.load(dataset) as npz:
        expected = Engine.load(onnx_model).predict(npz["images"], npz["magnitudes"], batch_size=32)
        z_true = npz["redshifts"]
    csv = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert csv[0] == "object_id,z_pred,z_true,flag"
    rows = [line.split(",", 3) for line in csv[1:]]
    assert [int(r[0]) for r in rows] == list(range(5000, 5150))
    got = np.array([float(r[1]) if r[1] else np.nan for r in rows])
    np.testing.assert_allclose(got, expected.redshift, atol=2e-6, equal_nan=True)
    assert rows[7][1] == "" and "non-finite magnitude" in rows[7][3]

    assert summary["galaxies"] == 150 == summary["galaxies_predicted"] + summary["galaxies_failed"]
    with np.load(dataset) as npz:
        bad = 5000 + np.flatnonzero(~np.isfinite(npz["magnitudes"]).all(axis=1))  # real faint galaxies too
    assert 5007 in bad
    assert sorted(r["object_id"] for r in summary["rejected_galaxies"]) == bad.tolist()
    assert summary["galaxies_rejected"] == len(bad) == np.isnan(got).sum()
    assert summary["partitions"] == 4 and summary["failed_partitions"] == []
    whole = metrics.evaluate(expected.redshift, z_true)
    for key in ("mse", "mae", "bias", "nmad", "outlier_fraction", "r2"):
        assert summary[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7)
    for key in ("wall_seconds", "galaxies_per_second", "throughput_bps"):
        assert summary[key] > 0
    assert summary["throughput_bps"] == pytest.approx(summary["galaxies_per_second"] * 164_160)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["galaxies"] == 150


def test_bad_partitions_fail_alone_and_are_listed(dataset, onnx_model, tmp_path):
    parts = tmp_path / "parts"
    make_partitions(dataset, parts, per_part=30)  # five partitions
    store = LocalStore(parts)
    # corrupt: same size, flipped pixels (only the manifest checksum can tell)
    data = bytearray(store.get("part-00002.safetensors"))
    data[-100:] = bytes(100)
    store.put("part-00002.safetensors", bytes(data))
    # truncated, and wrong shapes, with their manifest entries gone so the reader itself must notice
    store.put("part-00003.safetensors", store.get("part-00003.safetensors")[:5000])
    from safetensors.numpy import save

    store.put("part-00004.safetensors", save(
        {"images": np.zeros((3, 5, 16, 16), np.float32), "magnitudes": np.zeros((3, 5)),
         "redshifts": np.zeros(3, np.float32), "object_id": np.arange(3)}, metadata={"format": "cai-partition"}))
    manifest = json.loads(store.get("manifest.json"))
    manifest["partitions"] = [p for p in manifest["partitions"] if p["key"] not in
                              ("part-00003.safetensors", "part-00004.safetensors")]
    store.put("manifest.json", json.dumps(manifest).encode())

    summary = local.run(payload(parts, onnx_model, tmp_path / "run"), workers=2, progress=False)

    failed = {Path(f["partition"]).name: f for f in summary["failed_partitions"]}
    assert sorted(failed) == ["part-00002.safetensors", "part-00003.safetensors", "part-00004.safetensors"]
    assert "checksum" in failed["part-00002.safetensors"]["reason"]
    assert "truncated" in failed["part-00003.safetensors"]["reason"]
    assert "images has shape [3, 5, 16, 16], expected [3, 5, 32, 32]" in failed["part-00004.safetensors"]["reason"]
    assert failed["part-00002.safetensors"]["galaxies"] == 30  # known from the manifest
    assert summary["partitions"] == 5 and summary["partitions_failed"] == 3
    predicted = [r for r in summary["rejected_galaxies"]]
    assert summary["galaxies_predicted"] == 60 - len(predicted)  # partitions 1 and 5, less rejected galaxies
    assert summary["galaxies"] == summary["galaxies_predicted"] + summary["galaxies_failed"]


def test_a_missing_result_counts_as_failed(dataset, onnx_model, tmp_path):
    parts = tmp_path / "parts"
    make_partitions(dataset, parts, per_part=75)
    store = LocalStore("/")
    plan = pipeline.initialize(payload(parts, onnx_model, tmp_path / "run"), store)
    work = json.loads(store.get(plan["work_list_key"]))
    pipeline.execute({"run": plan["run"], "item": work[0]}, store)  # the second executor "crashed"
    summary = pipeline.summarize(plan, store)
    assert summary["partitions_failed"] == 1
    assert "did not finish" in summary["failed_partitions"][0]["reason"]
    assert summary["galaxies"] == 150 == summary["galaxies_predicted"] + summary["galaxies_failed"]


def test_rerun_overwrites_instead_of_duplicating(dataset, onnx_model, tmp_path):
    parts = tmp_path / "parts"
    make_partitions(dataset, parts, per_part=75)
    first = local.run(payload(parts, onnx_model, tmp_path / "run"), workers=1, progress=False)
    second = local.run(payload(parts, onnx_model, tmp_path / "run"), workers=1, progress=False)
    assert first["galaxies"] == second["galaxies"] == 150
    assert len(list((tmp_path / "run" / "partials").iterdir())) == 2
    assert len((tmp_path / "run" / "predictions.csv").read_text().splitlines()) == 151


def test_unloadable_model_fails_every_partition_with_its_reason(dataset, tmp_path):
    parts = tmp_path / "parts"
    make_partitions(dataset, parts, per_part=75)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    summary = local.run(payload(parts, broken, tmp_path / "run"), workers=1, progress=False)
    assert summary["partitions_failed"] == 2 and summary["galaxies_predicted"] == 0
    assert all("broken.onnx" in f["reason"] for f in summary["failed_partitions"])
    assert summary["galaxies"] == summary["galaxies_failed"] == 150


def test_cai_run_checks_data_and_model_before_writing_anything(tmp_path, dataset):
    from cai.errors import InputError
    from cai.run import run

    with pytest.raises(InputError, match=r"no such data: .*missing\.npz"):
        run(data=[str(dataset), str(tmp_path / "missing.npz")], out=str(tmp_path / "out"), progress=False)
    with pytest.raises(InputError, match=r"no model file .*nope\.onnx"):
        run(data=[str(dataset)], model=str(tmp_path / "nope.onnx"), out=str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "partitions").exists()  # nothing partitioned for a run that cannot start


def test_lambda_bill_is_configured_memory_whole_milliseconds_and_cold_starts(monkeypatch):
    monkeypatch.delenv("CAI_PRICE_GB_S", raising=False)
    monkeypatch.delenv("CAI_PRICE_REQUEST", raising=False)
    executors = [{"seconds": 1.0004, "init_seconds": 0.5, "memory_mb": 2048},  # cold: 1,501 ms billed
                 {"seconds": 2.0, "init_seconds": 0.0, "memory_mb": 2048}]
    bill = pipeline._bill(executors, "x86_64")
    assert bill["gb_seconds"] == pytest.approx(1.501 * 2 + 2.0 * 2)
    assert bill["init_seconds"] == pytest.approx(0.5)
    assert bill["cost_usd"] == pytest.approx(7.002 * 0.0000166667 + 2 * 0.20e-6, abs=1e-6)
    assert pipeline._bill(executors, "arm64")["price_per_gb_s"] == pytest.approx(0.8 * 0.0000166667, rel=1e-4)
    assert pipeline._bill([{"seconds": 1.0, "memory_mb": None}], "x86_64")["cost_usd"] is None  # not on Lambda


def test_a_cold_lambda_container_records_its_start_up_and_a_warm_one_does_not(dataset, onnx_model, tmp_path,
                                                                               monkeypatch):
    from types import SimpleNamespace

    parts = tmp_path / "parts"
    make_partitions(dataset, parts)
    plan = pipeline.initialize(payload(parts, onnx_model, tmp_path / "run"))
    context = SimpleNamespace(memory_limit_in_mb="10240", aws_request_id="r")
    item = json.loads((tmp_path / "run" / "work_list.json").read_text())[0]
    monkeypatch.setattr(pipeline, "_ENGINES", {})  # a new container
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "cai-dev-cosmicExecutor")

    pipeline.execute({"run": plan["run"], "item": item}, context=context)
    cold = json.loads((tmp_path / "run" / "executors" / "000000.json").read_text())
    assert cold["cold_start"] and cold["init_seconds"] > 0  # this process started before the call
    pipeline.execute({"run": plan["run"], "item": item}, context=context)
    warm = json.loads((tmp_path / "run" / "executors" / "000000.json").read_text())
    assert not warm["cold_start"] and warm["init_seconds"] == 0

    monkeypatch.setattr(pipeline, "_ENGINES", {})
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME")  # a pool worker or the emulator: no container start-up
    pipeline.execute({"run": plan["run"], "item": item}, context=context)
    assert json.loads((tmp_path / "run" / "executors" / "000000.json").read_text())["init_seconds"] == 0

"""The inference engine on both runtimes: parity, the ONNX export, input checks and the NaN policy."""

import json

import numpy as np
import pytest

from cai.errors import InputError, WeightsError
from cai.model.engine import REASON_MAGNITUDE, REASON_PIXELS, Engine


@pytest.fixture(scope="module")
def ort_engine(onnx_model):
    return Engine.load(onnx_model, runtime="onnxruntime", threads=2)


@pytest.fixture(scope="module")
def torch_engine(random_weights):
    return Engine.load(random_weights, runtime="torch")


@pytest.fixture(scope="module")
def clean(sdss_cutouts):
    """Twelve real galaxies with every value finite."""
    images, mags = sdss_cutouts
    ok = np.isfinite(mags).all(axis=1)
    return images[ok][:12].copy(), mags[ok][:12].copy()


def test_onnx_and_torch_agree_on_all_real_cutouts(ort_engine, torch_engine, sdss_cutouts):
    images, mags = sdss_cutouts
    onnx_run = ort_engine.predict(images, mags, batch_size=128)
    torch_run = torch_engine.predict(images, mags, batch_size=128)
    # 56 of the real galaxies lack a magnitude in some band: both engines reject exactly those
    missing = set(np.flatnonzero(~np.isfinite(mags).all(axis=1)).tolist())
    assert len(missing) == 56
    assert onnx_run.rejected == torch_run.rejected == dict.fromkeys(missing, REASON_MAGNITUDE)
    ok = onnx_run.predicted
    assert ok.sum() == 354 - 56 and np.isnan(onnx_run.redshift[~ok]).all()
    assert np.isfinite(onnx_run.redshift[ok]).all()
    np.testing.assert_allclose(onnx_run.redshift[ok], torch_run.redshift[ok], atol=1e-4, rtol=0)
    assert onnx_run.redshift.dtype == np.float32 and onnx_run.redshift.shape == (354,)


def test_exported_graph_has_the_contract(onnx_model, random_weights):
    import onnx

    from cai.model.weights import file_sha256

    model = onnx.load(str(onnx_model))
    onnx.checker.check_model(model)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(model.graph.input) + list(model.graph.output)}
    batch = dims["image"][0]
    assert isinstance(batch, str) and dims == {"image": [batch, 5, 32, 32], "magnitude": [batch, 5],
                                               "redshift": [batch, 1]}
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["model_version"] == "random-seed0" and meta["format"] == "cai-astromae"
    assert meta["weights_sha256"] == file_sha256(random_weights) and meta["opset"] == "18"


def test_engine_reports_model_version(ort_engine, torch_engine):
    assert ort_engine.model_version == torch_engine.model_version == "random-seed0"


def test_safetensors_on_onnxruntime_reuses_the_cached_export(onnx_model, random_weights, monkeypatch):
    from cai.model import export

    def no_export(*args, **kwargs):
        raise AssertionError("exported again instead of using the cache")

    monkeypatch.setattr(export, "export_onnx", no_export)
    engine = Engine.load(random_weights, runtime="onnxruntime")
    assert engine.model_version == "random-seed0"


def test_nan_and_inf_galaxies_are_rejected_not_imputed(ort_engine, clean):
    images, mags = (a.copy() for a in clean)
    reference = ort_engine.predict(images, mags).redshift
    images[2, 3, 10, 10] = np.nan
    mags[5, 1] = np.nan
    images[7, 0, 0, 0] = np.inf
    mags[7, 4] = -np.inf
    result = ort_engine.predict(images, mags, batch_size=4)
    assert result.rejected == {2: REASON_PIXELS, 5: REASON_MAGNITUDE, 7: f"{REASON_PIXELS}; {REASON_MAGNITUDE}"}
    assert np.isnan(result.redshift[[2, 5, 7]]).all()
    keep = result.predicted
    assert keep.sum() == 9
    np.testing.assert_allclose(result.redshift[keep], reference[keep], atol=1e-5, rtol=0)


def test_a_batch_of_only_rejected_galaxies(ort_engine, clean):
    images, mags = (a.copy() for a in clean)
    mags[:4] = np.nan
    result = ort_engine.predict(images, mags, batch_size=4)
    assert sorted(result.rejected) == [0, 1, 2, 3] and np.isfinite(result.redshift[4:]).all()


@pytest.mark.parametrize("batch_size", [1, 5, 12, 1000])
def test_any_batch_size_gives_the_same_redshifts(ort_engine, clean, batch_size):
    reference = ort_engine.predict(*clean, batch_size=12).redshift
    result = ort_engine.predict(*clean, batch_size=batch_size)
    assert result.rejected == {}
    np.testing.assert_allclose(result.redshift, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_zero_galaxies(runtime, ort_engine, torch_engine):
    engine = ort_engine if runtime == "onnxruntime" else torch_engine
    result = engine.predict(np.zeros((0, 5, 32, 32), np.float32), np.zeros((0, 5)), batch_size=7)
    assert result.redshift.shape == (0,) and result.redshift.dtype == np.float32 and result.rejected == {}


def test_torch_runtime_batches_not_dividing_n(torch_engine, ort_engine, clean):
    got = torch_engine.predict(*clean, batch_size=5).redshift
    np.testing.assert_allclose(got, ort_engine.predict(*clean).redshift, atol=1e-4, rtol=0)


def test_float64_and_integer_inputs_are_cast(ort_engine, clean):
    images, mags = clean
    reference = ort_engine.predict(images, mags).redshift
    np.testing.assert_allclose(ort_engine.predict(images.astype(np.float64), mags.astype(np.float64)).redshift,
                               reference, atol=1e-6)
    as_int = ort_engine.predict(np.round(images).astype(np.int16), mags.tolist())
    assert np.isfinite(as_int.redshift).all()


@pytest.mark.parametrize("images_shape, mags_shape, message", [
    ((4, 5, 32, 31), (4, 5), r"images have shape \[4, 5, 32, 31\], expected \[N, 5, 32, 32\]"),
    ((4, 32, 32, 5), (4, 5), r"images have shape \[4, 32, 32, 5\], expected \[N, 5, 32, 32\]"),
    ((5, 32, 32), (1, 5), r"images have shape \[5, 32, 32\], expected \[N, 5, 32, 32\]"),
    ((4, 5, 32, 32), (4, 4), r"magnitudes have shape \[4, 4\], expected \[N, 5\]"),
    ((4, 5, 32, 32), (3, 5), r"4 images but 3 magnitude rows"),
])
def test_wrong_shapes_name_actual_and_expected(ort_engine, images_shape, mags_shape, message):
    with pytest.raises(InputError, match=message):
        ort_engine.predict(np.zeros(images_shape, np.float32), np.zeros(mags_shape, np.float32))


@pytest.mark.parametrize("bad", [
    np.full((2, 5, 32, 32), "x"), np.zeros((2, 5, 32, 32), dtype=object), np.zeros((2, 5, 32, 32), np.complex64),
    np.zeros((2, 5, 32, 32), bool)], ids=["str", "object", "complex", "bool"])
def test_wrong_dtypes_are_input_errors(ort_engine, bad):
    with pytest.raises(InputError, match=f"images have dtype {bad.dtype}, expected real numbers"):
        ort_engine.predict(bad, np.zeros((2, 5)))


def test_string_magnitudes_are_input_errors(ort_engine):
    with pytest.raises(InputError, match="magnitudes have dtype <U"):
        ort_engine.predict(np.zeros((1, 5, 32, 32)), [["18.1", "17.2", "16.9", "16.5", "16.3"]])


def test_bad_batch_size(ort_engine, clean):
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        ort_engine.predict(*clean, batch_size=0)


def test_missing_model_file(tmp_path):
    for runtime in ("onnxruntime", "torch"):
        with pytest.raises(WeightsError, match="no such model file"):
            Engine.load(tmp_path / "nope.safetensors", runtime=runtime)


def test_truncated_weights_file(random_weights, tmp_path):
    raw = random_weights.read_bytes()
    cut = tmp_path / "half.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    for runtime in ("torch", "onnxruntime"):
        with pytest.raises(WeightsError, match="truncated or corrupt"):
            Engine.load(cut, runtime=runtime)


def test_truncated_onnx_file(onnx_model, tmp_path):
    raw = onnx_model.read_bytes()
    cut = tmp_path / "half.onnx"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="ONNX Runtime cannot load"):
        Engine.load(cut)


def test_runtime_and_file_kind_mismatches(onnx_model, random_weights):
    with pytest.raises(WeightsError, match="torch runtime cannot run"):
        Engine.load(onnx_model, runtime="torch")
    with pytest.raises(InputError, match="unknown runtime"):
        Engine.load(random_weights, runtime="tensorflow")
    with pytest.raises(InputError, match="threads must be a positive integer"):
        Engine.load(onnx_model, threads=0)


def test_onnxruntime_engine_runs_without_torch(onnx_model, random_weights, tmp_path, without_torch):
    without_torch(f"""
import numpy as np
from cai.errors import WeightsError
from cai.model.engine import Engine
engine = Engine.load({str(onnx_model)!r})
out = engine.predict(np.zeros((3, 5, 32, 32), np.float32), np.full((3, 5), 18.0))
assert out.redshift.shape == (3,) and np.isfinite(out.redshift).all(), out
try:
    Engine.load({str(random_weights)!r})
except WeightsError as exc:
    assert "torch is not installed" in str(exc) and ".onnx" in str(exc), exc
else:
    raise SystemExit("expected a WeightsError")
""", CAI_CACHE_DIR=str(tmp_path / "empty-cache"))


def test_bench_engine_cli_smoke(onnx_model, tmp_path, capsys):
    import argparse

    from cai.commands.model_tools import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    report = tmp_path / "bench.json"
    args = parser.parse_args(["bench", "engine", "--weights", str(onnx_model), "--runtimes", "onnxruntime", "torch",
                              "--batch-sizes", "4", "8", "--galaxies", "8", "--threads", "1", "--json", str(report)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "skipping torch" in printed and "galaxies/s" in printed
    data = json.loads(report.read_text())
    (run,) = data["runs"]
    assert run["runtime"] == "onnxruntime" and [r["batch_size"] for r in run["rows"]] == [4, 8]
    assert data["roofline_gflops"] > 0 and all(0 < r["roofline_fraction"] for r in run["rows"])
    assert all(r["peak_rss_mb"] > 50 for r in run["rows"])

"""The safetensors weight format: names, round trips and clear failures."""

import numpy as np
import pytest
import torch

from cai.errors import WeightsError
from cai.model.astromae import AstroMAE
from cai.model.weights import (FORMAT, load_model, load_state_dict, read_metadata, read_weights_numpy,
                               save_weights)


def spec_state_dict_names() -> set[str]:
    """The official names, written out from the patterns in docs/astromae.md, not from the model."""
    wb = ("weight", "bias")
    bn = wb + ("running_mean", "running_var", "num_batches_tracked")
    names = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(12):
        cell = f"blocks.{i}."
        names |= {cell + f"{n}.{p}" for n in ("norm1", "norm2") for p in wb}
        names |= {cell + "attn.qkv.weight", cell + "attn.q_bias", cell + "attn.v_bias"}
        names |= {cell + f"{n}.{p}" for n in ("attn.proj", "mlp.fc1", "mlp.fc2", "PCM.0", "PCM.3") for p in wb}
        names |= {cell + f"PCM.1.{p}" for p in bn}
    for layer in ("fc_norm", "head", "vit_block.0", "vit_block.2", "concat_block.0", "concat_block.2"):
        names |= {f"{layer}.{p}" for p in wb}
    mix = "inception_model."
    names |= {f"{mix}magnitude_block.{i}.{p}" for i in (0, 2, 4, 6, 8) for p in wb}
    for block in (2, 3, 5, 6, 8):
        stem = f"{mix}vis_inception.{block}."
        for conv in ("branch1", "branch2.0", "branch2.1", "branch3.0", "branch3.1", "branch4.1"):
            names |= {f"{stem}{conv}.conv.{p}" for p in wb}
            names |= {f"{stem}{conv}.bn.{p}" for p in bn}
    names |= {f"{mix}vis_inception.{i}.{p}" for i in (10, 12) for p in wb}
    names |= {f"{mix}{layer}.{p}" for layer in ("conv2d_init", "vis_inception.0") for p in wb}
    return names


def test_state_dict_names_match_the_spec_exactly():
    expected = spec_state_dict_names()
    actual = set(AstroMAE().state_dict())
    assert actual == expected, (sorted(actual - expected)[:5], sorted(expected - actual)[:5])


@pytest.fixture(scope="module")
def small_state():
    torch.manual_seed(1)
    model = AstroMAE().eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.num_batches_tracked.fill_(7)
    return model.state_dict()


def test_weights_float32_round_trip_is_exact(small_state, tmp_path):
    path = save_weights(small_state, tmp_path / "w.safetensors", dtype="float32",
                        metadata={"model_version": "v-test", "trained_on": "SDSS_MGS.train"})
    loaded = load_state_dict(path)
    assert set(loaded) == set(small_state)
    for name, value in small_state.items():
        assert loaded[name].dtype == (torch.int64 if "num_batches" in name else torch.float32)
        assert torch.equal(loaded[name], value), name
    meta = read_metadata(path)
    assert meta["format"] == FORMAT and meta["model_version"] == "v-test" and meta["trained_on"] == "SDSS_MGS.train"


def test_weights_float16_halves_the_file_and_keeps_counters(small_state, tmp_path):
    half = save_weights(small_state, tmp_path / "h.safetensors", dtype="float16")
    full = save_weights(small_state, tmp_path / "f.safetensors", dtype="float32")
    assert half.stat().st_size < 0.55 * full.stat().st_size
    arrays, meta = read_weights_numpy(half)
    assert meta["dtype"] == "float16" and meta["model_version"].startswith("astromae-")
    assert arrays["blocks.0.PCM.1.num_batches_tracked"].dtype == np.int64
    assert int(arrays["blocks.0.PCM.1.num_batches_tracked"]) == 7
    assert arrays["blocks.0.PCM.1.num_batches_tracked"].shape == ()
    assert arrays["head.weight"].dtype == np.float32
    np.testing.assert_allclose(arrays["head.weight"], small_state["head.weight"].numpy(), atol=1e-3)


def test_weights_float16_overflow_is_refused(tmp_path):
    with pytest.raises(WeightsError, match="overflows float16"):
        save_weights({"x": np.array([1e6], dtype=np.float32)}, tmp_path / "x.safetensors", dtype="float16")


def test_load_model_is_strict_and_in_eval_mode(random_weights):
    model = load_model(random_weights)
    assert not model.training and model.model_version == "random-seed0"


def test_read_weights_numpy_needs_no_torch(random_weights, without_torch):
    without_torch("from cai.model.weights import read_weights_numpy\n"
                  f"arrays, meta = read_weights_numpy({str(random_weights)!r})\n"
                  "assert len(arrays) == 508 and meta['model_version'] == 'random-seed0'\n")


def test_missing_weights_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="no such weights file"):
        load_model(tmp_path / "nope.safetensors")


def test_truncated_weights_file_is_a_weights_error(random_weights, tmp_path):
    raw = random_weights.read_bytes()
    cut = tmp_path / "half.safetensors"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_model(cut)
    cut.write_bytes(raw[:5])  # not even a whole header length
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_weights_numpy(cut)


def test_safetensors_without_our_format_tag_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(WeightsError, match="not CAI AstroMAE weights"):
        load_model(tmp_path / "other.safetensors")


def test_wrong_keys_are_named(small_state, tmp_path):
    state = dict(small_state)
    del state["head.bias"], state["blocks.3.attn.q_bias"]
    state["extra.weight"] = torch.zeros(3)
    path = save_weights(state, tmp_path / "w.safetensors", dtype="float32")
    with pytest.raises(WeightsError) as info:
        load_model(path)
    message = str(info.value)
    assert "2 missing" in message and "head.bias" in message and "blocks.3.attn.q_bias" in message
    assert "1 unexpected" in message and "extra.weight" in message


def test_wrong_shapes_are_named(small_state, tmp_path):
    state = dict(small_state)
    state["head.weight"] = torch.zeros(192, 191)
    path = save_weights(state, tmp_path / "w.safetensors", dtype="float32")
    with pytest.raises(WeightsError, match=r"head.weight is \(192, 191\), expected \(192, 192\)"):
        load_model(path)


def test_dataparallel_prefix_gets_a_hint(small_state, tmp_path):
    path = save_weights({f"module.{k}": v for k, v in small_state.items()}, tmp_path / "w.safetensors",
                        dtype="float32")
    with pytest.raises(WeightsError, match="module."):
        load_state_dict(path)

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cai import train
from cai.model.astromae import AstroMAE
from cai.model.weights import load_model

TRAIN = "data/sdss_mgs/SDSS_MGS.train"
TEST = "data/sdss_mgs/SDSS_MGS.test"


def test_tiny_training_run_writes_loadable_weights_and_settings(tmp_path):
    out = tmp_path / "demo.safetensors"
    record = train.train(TRAIN, out, seed=0, limit=200, epochs=2, finetune_epochs=1, batch_size=64,
                         log=lambda _: None)

    assert record["trainable_parameters"] == 10_398_057
    assert [r["stage"] for r in record["history"]] == ["head", "head", "all"]
    settings = json.loads((tmp_path / "train-settings.json").read_text())
    assert settings["seed"] == 0 and settings["epochs"] == 2
    assert settings["data"]["train_catalog_sha256"]

    # float16 on disk, keyed exactly as the model, loadable strictly
    tensors = load_file(str(out))
    assert set(tensors) == set(AstroMAE().state_dict())
    assert tensors["concat_block.2.weight"].dtype == torch.float16
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["format"] == "cai-astromae"
    assert load_model(out).model_version == record["model_version"]

    result = train.score(out, TEST, seed=0, limit=50)
    assert result["test"]["labelled"] == 50


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    from safetensors.numpy import load_file

    def weights(seed, name):
        out = tmp_path / name / "demo.safetensors"
        record = train.train(TRAIN, out, seed=seed, limit=120, epochs=1, finetune_epochs=1, batch_size=64,
                             log=lambda _: None)
        return record["model_version"], load_file(str(out))

    version, tensors = weights(0, "a")
    again, tensors_again = weights(0, "b")
    # every tensor bit for bit (seeded render, init, split and batches; deterministic ops), so the same
    # version; not the file's sha256: safetensors writes the metadata keys in a random order
    assert again == version
    assert all((tensors[k] == tensors_again[k]).all() for k in tensors)
    assert weights(1, "c")[0] != version


def test_cai_train_pins_the_kernels_so_other_cpus_train_the_same_weights(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "demo.safetensors"
    subprocess.run([sys.executable, "-m", "cai", "train", "--limit", "80", "--epochs", "1", "--finetune-epochs", "0",
                    "--test-catalog", "none", "--out", str(out)], check=True, capture_output=True)
    kernels = json.loads((tmp_path / "train-settings.json").read_text())["versions"]["kernels"]
    if train.X86_64:
        assert kernels["pinned"] and kernels["cpu_capability"] == "AVX2"
        assert {k: kernels[k] for k in train.KERNEL_PINS} == train.KERNEL_PINS
    else:
        assert not kernels["pinned"]


def test_frozen_encoder_leaves_the_paper_trainable_count():
    assert train.freeze_encoder(AstroMAE()) == 10_398_057


def test_data_dependent_init_folds_standardisation_into_the_first_layer():
    model = AstroMAE()
    first = model.inception_model.magnitude_block[0]
    weight, bias = first.weight.detach().clone(), first.bias.detach().clone()
    mags = torch.randn(100, 5, dtype=torch.float64) * 2 + 17
    train.data_dependent_init(model, torch.randn(100, 5, 32, 32), mags, 0.1)

    raw = mags.float()
    standard = (raw - raw.mean(0)) / raw.std(0)
    with torch.no_grad():
        # the new layer on raw magnitudes is the old layer on standardised ones
        assert torch.allclose(first(raw), standard @ weight.T + bias, atol=1e-4)
    assert abs(model.concat_block[2].bias.item() - 0.1) < 1e-6


def test_cached_features_reproduce_the_full_forward():
    torch.manual_seed(0)
    model = AstroMAE()
    images, mags = torch.rand(8, 5, 32, 32), torch.rand(8, 5, dtype=torch.float64) * 5 + 15
    train.calibrate_batchnorm(model.inception_model.vis_inception, images)
    model.eval()
    with torch.no_grad():
        full = model(images, mags)
        cached = train.forward_from_features(
            model, train.encode_all(model, images), train.conv_features_all(model, images), mags)
    assert torch.allclose(full, cached, atol=1e-5)

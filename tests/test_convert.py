"""The safe unpickler and the official-checkpoint converter."""

import io
import os
import pickle
import sys
import types
import warnings
import zipfile

import numpy as np
import pytest
import torch

from cai.errors import UnsafePickleError, WeightsError
from cai.model import astromae
from cai.model.pickle_safe import (LEGACY_MAGIC, LEGACY_PROTOCOL, convert_checkpoint, load_pt,
                                   state_dict_from_checkpoint, tensor_dataset_arrays)
from cai.model.weights import load_model

# our class -> the authors' import path, as the official pickle names them
OFFICIAL_PATHS = {
    astromae.AstroMAE: "blocks.model_vit_inception.ViT_Astro",
    astromae.InputMixModel: "blocks.photoz.Input_Mix_Model",
    astromae.InceptionBlock: "blocks.photoz.InceptionBlock",
    astromae.ConvBlock: "blocks.photoz.ConvBlock",
    astromae.NormalCell: "NormalCell.NormalCell",
    astromae.Attention: "NormalCell.Attention",
    astromae.Mlp: "NormalCell.Mlp",
    astromae.PatchEmbed: "timm.models.layers.patch_embed.PatchEmbed",
}


def official_replica(monkeypatch) -> torch.nn.Module:
    """AstroMAE whose modules are re-labelled as the authors' classes, importable only inside monkeypatch."""
    replicas = {}
    for ours, path in OFFICIAL_PATHS.items():
        module_name, name = path.rsplit(".", 1)
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):  # blocks, blocks.photoz, timm, timm.models, ...
            dotted = ".".join(parts[:depth])
            if dotted not in sys.modules:
                monkeypatch.setitem(sys.modules, dotted, types.ModuleType(dotted))
        replica = type(name, (ours,), {"__module__": module_name, "__qualname__": name})
        monkeypatch.setattr(sys.modules[module_name], name, replica, raising=False)
        replicas[ours] = replica

    torch.manual_seed(3)
    model = astromae.AstroMAE()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # non-trivial running stats and affine
                module.running_mean.normal_(0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.8, 1.2)
                module.bias.normal_(0, 0.1)
                module.num_batches_tracked.fill_(1234)
    for module in model.modules():
        if type(module) in replicas:
            module.__class__ = replicas[type(module)]
    return model.eval()


def save_official(model, path, legacy=False):
    wrapper = torch.nn.DataParallel(model)
    # as saved on the authors' GPU machine
    wrapper.device_ids, wrapper.output_device, wrapper.src_device_obj = [0], 0, torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy saves warn that the replicas' source cannot be found
        torch.save(wrapper, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_official_checkpoint_converts_and_reproduces_predictions(monkeypatch, tmp_path, sdss_cutouts, legacy):
    images, mags = sdss_cutouts
    ok = np.isfinite(mags).all(axis=1)
    image, mag = torch.from_numpy(images[ok][:16]), torch.from_numpy(mags[ok][:16])
    checkpoint = tmp_path / "Mixed_Inception_z_VITAE_Base_Img_Full_New_Full.pt"
    with monkeypatch.context() as patch:
        replica = official_replica(patch)
        with torch.no_grad():
            expected = replica(image, mag).numpy()
        save_official(replica, checkpoint, legacy=legacy)
    assert "blocks" not in sys.modules and "NormalCell" not in sys.modules
    raw = checkpoint.read_bytes()
    assert b"blocks.model_vit_inception" in raw and b"NormalCell" in raw
    with pytest.raises(ModuleNotFoundError):  # what torch.load needs and we do not
        torch.load(checkpoint, weights_only=False)

    out = convert_checkpoint(checkpoint, tmp_path / "official.safetensors", dtype="float32")
    model = load_model(out)
    with torch.no_grad():
        got = model(image, mag).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert model.model_version == "astromae-official"
    state = model.state_dict()
    assert int(state["blocks.5.PCM.1.num_batches_tracked"]) == 1234
    assert torch.equal(state["inception_model.conv2d_init.weight"], state["inception_model.vis_inception.0.weight"])


def test_cli_convert(monkeypatch, tmp_path, capsys):
    import argparse

    from cai.commands.model_tools import register

    with monkeypatch.context() as patch:
        save_official(official_replica(patch), tmp_path / "official.pt")
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["convert", str(tmp_path / "official.pt"), "--out", str(tmp_path / "w.safetensors"),
                              "--dtype", "float16", "--model-version", "official-fp16"])
    assert args.func(args) == 0
    assert "no code from the pickle was run" in capsys.readouterr().out
    assert load_model(tmp_path / "w.safetensors").model_version == "official-fp16"


def test_a_checkpoint_of_another_model_is_refused_with_names(tmp_path):
    torch.save(torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(2, 3))), tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=r"missing \(.*unexpected \(0.bias, 0.weight"):
        convert_checkpoint(tmp_path / "other.pt", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()


class Payload:
    """Unpickling this runs ``touch <path>``, the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def torch_style_zip(pickled: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return buffer.getvalue()


def legacy_stream(pickled: bytes) -> bytes:
    head = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}))
    return head + pickled


def test_the_payload_really_runs_under_plain_pickle(tmp_path):
    # control: without the allow-list this pickle does run code
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


@pytest.mark.parametrize("wrap", [torch_style_zip, legacy_stream, lambda b: b], ids=["zip", "legacy", "raw"])
@pytest.mark.parametrize("from_file", [True, False], ids=["file", "bytes"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, wrap, from_file):
    marker = tmp_path / "pwned"
    inner = {"model": [1, 2, Payload(marker)]}  # buried inside harmless containers
    data = wrap(pickle.dumps(inner, protocol=2))
    source = data
    if from_file:
        source = tmp_path / "evil.pt"
        source.write_bytes(data)
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.system.*nothing was run"):
        load_pt(source)
    assert not marker.exists()


@pytest.mark.parametrize("module, name, reported", [
    ("builtins", "eval", "builtins.eval"), ("__builtin__", "exec", "builtins.exec"),
    ("subprocess", "Popen", "subprocess.Popen"), ("torch", "load", "torch.load"),
    ("torch.storage", "_load_from_bytes", "torch.storage._load_from_bytes"),
    ("cai.model.weights", "save_weights", "cai.model.weights.save_weights")])
def test_globals_outside_the_allow_list_are_refused(module, name, reported):
    crafted = f"c{module}\n{name}\n(S'print(1)'\ntR.".encode()  # protocol 0: GLOBAL, MARK, STRING, TUPLE, REDUCE
    with pytest.raises(UnsafePickleError, match=reported.replace(".", r"\.") + ".*nothing was run"):
        load_pt(crafted)


def test_tensor_dataset_partition_reads_as_arrays(tmp_path):
    from torch.utils.data import TensorDataset

    rng = np.random.default_rng(0)
    images = rng.standard_normal((7, 5, 32, 32)).astype(np.float32)
    mags = rng.uniform(14, 22, (7, 5))  # float64, as in the authors' data
    z = rng.uniform(0, 0.4, 7).astype(np.float32)
    for legacy in (False, True):
        path = tmp_path / f"1-{legacy}.pt"
        torch.save(TensorDataset(*map(torch.from_numpy, (images, mags, z))), path,
                   _use_new_zipfile_serialization=not legacy)
        got = tensor_dataset_arrays(load_pt(path))
        assert [a.dtype for a in got] == [np.float32, np.float64, np.float32]
        for a, b in zip(got, (images, mags, z)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightsError, match="expected a pickled TensorDataset"):
        tensor_dataset_arrays({"a": 1})


def test_partitions_read_without_torch(tmp_path, without_torch):
    from torch.utils.data import TensorDataset

    torch.save(TensorDataset(torch.ones(3, 5, 32, 32), torch.zeros(3, 5, dtype=torch.float64)), tmp_path / "1.pt")
    without_torch("from cai.model.pickle_safe import load_pt, tensor_dataset_arrays\n"
                  f"images, mags = tensor_dataset_arrays(load_pt({str(tmp_path / '1.pt')!r}))\n"
                  "assert images.shape == (3, 5, 32, 32) and images.sum() == 3 * 5 * 32 * 32 "
                  "and mags.dtype == 'float64'\n")


def test_views_strides_and_dtypes_come_back_exactly(tmp_path):
    x = torch.arange(24.0).reshape(2, 3, 4)
    tensors = {"transposed": x.transpose(0, 2), "offset_view": x[1, 1:, 2:], "half": x.half()[0],
               "bfloat16": x.bfloat16(), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
               "bool": torch.tensor([True, False]), "int8": torch.tensor([-3, 4], dtype=torch.int8)}
    for legacy in (False, True):
        buffer = io.BytesIO()
        torch.save(tensors, buffer, _use_new_zipfile_serialization=not legacy)
        got = load_pt(buffer.getvalue())
        for name, tensor in tensors.items():
            ref = tensor.float().numpy() if name == "bfloat16" else tensor.numpy()
            assert got[name].dtype == ref.dtype and got[name].shape == ref.shape, name
            np.testing.assert_array_equal(got[name], ref)


def test_numpy_attributes_load_but_functions_inside_them_do_not(tmp_path):
    buffer = io.BytesIO()
    torch.save({"rate": np.float64(0.1), "grid": np.arange(6).reshape(2, 3), "t": torch.ones(2)}, buffer)
    got = load_pt(buffer.getvalue())
    assert got["rate"] == 0.1 and got["grid"].tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(UnsafePickleError, match=r"(posix|os)\.getcwd"):
        load_pt(pickle.dumps(np.array([os.getcwd], dtype=object)))


def test_state_dict_checkpoints_are_accepted_too(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3))
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "sd.pt")
    flat = state_dict_from_checkpoint(load_pt(tmp_path / "sd.pt"))
    assert sorted(flat) == ["0.bias", "0.weight"]


def test_truncated_and_missing_checkpoints_are_weights_errors(monkeypatch, tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_pt(tmp_path / "missing.pt")
    with monkeypatch.context() as patch:
        save_official(official_replica(patch), tmp_path / "full.pt")
        save_official(official_replica(patch), tmp_path / "legacy.pt", legacy=True)
    for name in ("full.pt", "legacy.pt"):
        raw = (tmp_path / name).read_bytes()
        (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
        with pytest.raises(WeightsError, match="truncated|corrupt"):
            convert_checkpoint(tmp_path / "cut.pt", tmp_path / "w.safetensors")

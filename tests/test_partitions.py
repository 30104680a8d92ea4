import json

import h5py
import numpy as np
import pytest

from cai.errors import InputError, PartitionError
from cai.partitions import GALAXY_BYTES, Galaxies, decode, encode, galaxies_per_partition, read_source, \
    write_partitions
from cai.store import LocalStore, natural_key


def galaxies(n, seed=0, start_id=100):
    rng = np.random.default_rng(seed)
    return Galaxies(rng.normal(0, 1, (n, 5, 32, 32)).astype(np.float32),
                    rng.uniform(14, 22, (n, 5)), rng.uniform(0, 0.3, n).astype(np.float32),
                    np.arange(start_id, start_id + n, dtype=np.int64))


def test_partition_roundtrip_keeps_every_array():
    g = galaxies(7)
    back = decode(encode(g))
    for field in ("images", "magnitudes", "redshifts", "object_id"):
        np.testing.assert_array_equal(getattr(back, field), getattr(g, field))
    assert back.magnitudes.dtype == np.float64 and back.object_id.dtype == np.int64


def test_size_in_mb_sets_galaxies_per_partition():
    assert galaxies_per_partition(25) == 25 * 2**20 // GALAXY_BYTES == 1276  # the paper's 25 MB holds 1,278
    with pytest.raises(InputError, match="not positive"):
        galaxies_per_partition(0)


@pytest.mark.parametrize("cut", [4, 100, 5000])
def test_truncated_partition_is_named(cut):
    data = encode(galaxies(3))
    with pytest.raises(PartitionError, match="truncated|corrupt|too short"):
        decode(data[:cut], "p.safetensors")


def test_wrong_shapes_are_named():
    from safetensors.numpy import save

    bad = save({"images": np.zeros((2, 5, 16, 16), np.float32), "magnitudes": np.zeros((2, 5)),
                "redshifts": np.zeros(2, np.float32), "object_id": np.arange(2)},
               metadata={"format": "cai-partition"})
    with pytest.raises(PartitionError, match=r"images has shape \[2, 5, 16, 16\], expected \[2, 5, 32, 32\]"):
        decode(bad, "p")


def test_sources_stream_into_partitions_with_ids_and_manifest(tmp_path):
    g = galaxies(50)
    np.savez(tmp_path / "a.npz", images=g.images, magnitudes=g.magnitudes, redshifts=g.redshifts)
    with h5py.File(tmp_path / "b.h5", "w") as h5:
        for field in ("images", "magnitudes", "object_id"):
            h5[field] = getattr(g, field)[:20]
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "images.npy", g.images[:5])
    np.save(folder / "mags.npy", g.magnitudes[:5])

    store = LocalStore(tmp_path / "parts")
    manifest = write_partitions([str(tmp_path / "a.npz"), str(tmp_path / "b.h5"), str(folder)], store, "",
                                size_mb=0, galaxies_per_part=16)
    assert manifest["galaxies"] == 75
    assert [p["galaxies"] for p in manifest["partitions"]] == [16, 16, 16, 16, 11]
    assert json.loads((tmp_path / "parts" / "manifest.json").read_text()) == manifest
    ids = np.concatenate([decode(store.get(p["key"])).object_id for p in manifest["partitions"]])
    # npz without ids: numbered from 1; h5 keeps its own; the npy folder continues after the 70 before it
    assert ids.tolist() == list(range(1, 51)) + list(range(100, 120)) + list(range(71, 76))
    labelled = [p["labelled"] for p in manifest["partitions"]]
    assert sum(labelled) == 50  # the h5 and npy galaxies have no redshift


@pytest.mark.parametrize("kind", ["npz", "npz_compressed", "npy", "h5"])
def test_sources_are_read_a_block_at_a_time_never_whole(tmp_path, kind):
    g = galaxies(45)
    arrays = {"images": g.images, "magnitudes": g.magnitudes, "redshifts": g.redshifts}
    if kind == "npz":
        np.savez(tmp_path / "s.npz", **arrays)
    elif kind == "npz_compressed":
        np.savez_compressed(tmp_path / "s.npz", **arrays)
    elif kind == "npy":
        (tmp_path / "s").mkdir()
        for name, array in arrays.items():
            np.save(tmp_path / "s" / f"{name}.npy", array)
    else:
        with h5py.File(tmp_path / "s.h5", "w") as h5:
            for name, array in arrays.items():
                h5[name] = array
    source = str(tmp_path / {"npy": "s", "h5": "s.h5"}.get(kind, "s.npz"))

    blocks = list(read_source(source, chunk=10))
    assert [len(b) for b in blocks] == [10, 10, 10, 10, 5]  # only one block's rows were ever read
    np.testing.assert_array_equal(np.concatenate([b.images for b in blocks]), g.images)
    np.testing.assert_array_equal(np.concatenate([b.magnitudes for b in blocks]), g.magnitudes)
    np.testing.assert_array_equal(np.concatenate([b.redshifts for b in blocks]), g.redshifts)


@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_npy_reads_never_ask_for_more_than_a_block(tmp_path, monkeypatch, kind):
    from cai import partitions

    g = galaxies(30)
    if kind == "npz":
        np.savez(tmp_path / "s.npz", images=g.images, magnitudes=g.magnitudes)
    else:
        (tmp_path / "s").mkdir()
        np.save(tmp_path / "s" / "images.npy", g.images)
        np.save(tmp_path / "s" / "magnitudes.npy", g.magnitudes)
    asked = []
    original = partitions._NpyArray.__getitem__

    def counted(self, rows):
        block = original(self, rows)
        asked.append(len(block))
        return block

    monkeypatch.setattr(partitions._NpyArray, "__getitem__", counted)
    source = tmp_path / ("s.npz" if kind == "npz" else "s")
    assert sum(len(b) for b in read_source(str(source), chunk=8)) == 30
    assert asked and max(asked) <= 8  # not even the length of the images is found by reading them


def test_truncated_npy_source_is_named(tmp_path):
    (tmp_path / "s").mkdir()
    g = galaxies(20)
    np.save(tmp_path / "s" / "images.npy", g.images)
    np.save(tmp_path / "s" / "magnitudes.npy", g.magnitudes)
    data = (tmp_path / "s" / "images.npy").read_bytes()
    (tmp_path / "s" / "images.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="images.npy is truncated"):
        list(read_source(str(tmp_path / "s"), chunk=8))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        list(read_source(str(tmp_path / "bad.npz")))


def test_source_errors_name_the_problem(tmp_path):
    np.savez(tmp_path / "x.npz", pictures=np.zeros((2, 5, 32, 32)))
    with pytest.raises(InputError, match="no images array"):
        list(read_source(str(tmp_path / "x.npz")))
    np.savez(tmp_path / "y.npz", images=np.zeros((2, 3, 32, 32)), magnitudes=np.zeros((2, 5)))
    with pytest.raises(InputError, match="expected \\[N, 5, 32, 32\\]"):
        list(read_source(str(tmp_path / "y.npz")))
    with pytest.raises(InputError, match="no such source"):
        list(read_source(str(tmp_path / "missing.npz")))


def test_64_pixel_cutouts_are_centre_cropped(tmp_path):
    images = np.zeros((1, 5, 64, 64), np.float32)
    images[0, :, 16:48, 16:48] = 1.0
    np.savez(tmp_path / "big.npz", images=images, magnitudes=np.ones((1, 5)))
    (block,) = read_source(str(tmp_path / "big.npz"))
    assert block.images.shape == (1, 5, 32, 32) and block.images.min() == 1.0


def test_natural_order():
    keys = ["p/10.pt", "p/2.pt", "p/1.pt", "p/100.pt"]
    assert sorted(keys, key=natural_key) == ["p/1.pt", "p/2.pt", "p/10.pt", "p/100.pt"]


def test_cli_names_an_unwritable_destination_without_a_traceback(tmp_path, capsys):
    from cai.cli import main

    g = galaxies(3)
    np.savez(tmp_path / "s.npz", images=g.images, magnitudes=g.magnitudes)
    (tmp_path / "file").write_text("not a folder")
    assert main(["partition", str(tmp_path / "s.npz"), "--out", str(tmp_path / "file" / "parts")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cai partition: error: cannot use ") and "file/parts" in err and "Traceback" not in err

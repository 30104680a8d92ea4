"""Partitions: the unit of work of one executor.

A partition is a safetensors file: no pickle, read straight from the bytes of
one S3 GET, and self-describing (dtype and shape of every array, plus our
metadata in the header). Arrays:

- ``images``      float32 [N, 5, 32, 32], bands u, g, r, i, z
- ``magnitudes``  float64 [N, 5]
- ``redshifts``   float32 [N], NaN where no spectroscopic redshift is known
- ``object_id``   int64 [N], every galaxy keeps its id from source to prediction

``cai partition`` streams sources into partitions of about ``size_mb`` MiB
and writes ``manifest.json`` (key, galaxies, bytes, sha256 per partition).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cai.errors import InputError, PartitionError

FORMAT = "cai-partition"
FORMAT_VERSION = "1"
MANIFEST = "manifest.json"
SUFFIX = ".safetensors"
IMAGE_SHAPE = (5, 32, 32)
# bytes a galaxy takes in a partition: image, magnitudes, redshift, id
GALAXY_BYTES = 4 * 5 * 32 * 32 + 8 * 5 + 4 + 8
# the paper's throughput counts image + magnitudes as stored by the authors
GALAXY_BITS = (4 * 5 * 32 * 32 + 8 * 5) * 8

_ALIASES = {
    "images": ("images", "image", "x", "cutouts"),
    "magnitudes": ("magnitudes", "magnitude", "mags", "mag", "aperture_mag"),
    "redshifts": ("redshifts", "redshift", "z", "zs", "z_spec", "specz"),
    "object_id": ("object_id", "objid", "obj_id", "ids", "id"),
}


@dataclass
class Galaxies:
    """A block of galaxies held as arrays."""

    images: np.ndarray
    magnitudes: np.ndarray
    redshifts: np.ndarray
    object_id: np.ndarray

    def __len__(self):
        return len(self.object_id)

    def slice(self, start, stop) -> "Galaxies":
        return Galaxies(self.images[start:stop], self.magnitudes[start:stop],
                        self.redshifts[start:stop], self.object_id[start:stop])

    @staticmethod
    def concat(blocks: list["Galaxies"]) -> "Galaxies":
        if len(blocks) == 1:
            return blocks[0]
        return Galaxies(*(np.concatenate([getattr(b, f) for b in blocks])
                          for f in ("images", "magnitudes", "redshifts", "object_id")))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def galaxies_per_partition(size_mb: float) -> int:
    if not size_mb or size_mb <= 0:
        raise InputError(f"partition size {size_mb} MB is not positive", "pass --size-mb 25 (or 50, 75, 100)")
    return max(1, int(size_mb * 2**20 // GALAXY_BYTES))


# --- one partition ---------------------------------------------------------------------------

def encode(galaxies: Galaxies, metadata: dict | None = None) -> bytes:
    """Galaxies -> partition bytes."""
    from safetensors.numpy import save

    meta = {"format": FORMAT, "version": FORMAT_VERSION, "galaxies": str(len(galaxies)),
            "bands": "u,g,r,i,z"}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    arrays = {
        "images": np.ascontiguousarray(galaxies.images, dtype=np.float32),
        "magnitudes": np.ascontiguousarray(galaxies.magnitudes, dtype=np.float64),
        "redshifts": np.ascontiguousarray(galaxies.redshifts, dtype=np.float32),
        "object_id": np.ascontiguousarray(galaxies.object_id, dtype=np.int64),
    }
    return save(arrays, metadata=meta)


def read_header(data: bytes, name: str = "partition") -> dict:
    """The safetensors header (array dtypes, shapes and our metadata), without reading the arrays."""
    if len(data) < 8:
        raise PartitionError(f"{name} is {len(data)} bytes long, too short to be a partition",
                             "the file is truncated or empty: write it again with `cai partition`")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8 or length > 100_000_000:
        raise PartitionError(f"{name} is truncated or not a partition (header claims {length} bytes)",
                             "write it again with `cai partition`")
    try:
        return json.loads(data[8:8 + length])
    except ValueError:
        raise PartitionError(f"{name} has an unreadable header", "write it again with `cai partition`") from None


def decode(data: bytes, name: str = "partition") -> Galaxies:
    """Partition bytes -> galaxies, checking every array's presence, dtype and shape."""
    from safetensors.numpy import load

    header = read_header(data, name)
    meta = header.get("__metadata__") or {}
    if meta.get("format") != FORMAT:
        raise PartitionError(f"{name} is not a CAI partition (format {meta.get('format')!r})",
                             "convert your data with `cai partition`")
    try:
        arrays = load(data)
    except Exception as exc:  # safetensors reports truncation and bad offsets as one error class
        raise PartitionError(f"{name} is corrupt or truncated: {exc}", "write it again with `cai partition`") from None
    missing = [k for k in _ALIASES if k not in arrays]
    if missing:
        raise PartitionError(f"{name} lacks arrays {missing}", "write it again with `cai partition`")
    n = arrays["object_id"].shape[0] if arrays["object_id"].ndim == 1 else -1
    expected = {"images": (n, *IMAGE_SHAPE), "magnitudes": (n, 5), "redshifts": (n,), "object_id": (n,)}
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise PartitionError(f"{name}: {key} has shape {list(arrays[key].shape)}, expected {list(shape)}",
                                 "images must be [N, 5, 32, 32] in u, g, r, i, z; magnitudes [N, 5]")
    return Galaxies(arrays["images"], arrays["magnitudes"], arrays["redshifts"], arrays["object_id"])


# --- sources ---------------------------------------------------------------------------------

def _pick(arrays: dict, field: str, source: str, required: bool):
    for alias in _ALIASES[field]:
        if alias in arrays:
            return alias
    if required:
        raise InputError(f"{source} has no {field} array (looked for {', '.join(_ALIASES[field])}; "
                         f"found {', '.join(sorted(arrays)) or 'nothing'})",
                         "name the arrays images, magnitudes, redshifts, object_id")
    return None


class _NpyArray:
    """Row slices of one ``.npy`` array, read from an open file handle on demand.

    Not a memory map, nor one read of the whole: mapped or loaded pages stay in
    the process's resident set, so a large source would be held in memory.
    Works on a plain file and on a member of an ``.npz`` (a zip), whose reads
    run forward as the blocks do.
    """

    def __init__(self, handle, name: str):
        self.handle, self.name = handle, name
        try:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
        except ValueError as exc:
            raise InputError(f"{name} is not a readable .npy array: {exc}", "save it with np.save or np.savez") from None
        if fortran or dtype.hasobject:
            raise InputError(f"{name} is Fortran-ordered or holds Python objects", "save it with np.save(C-order)")
        self.offset = handle.tell()
        self.shape, self.dtype = shape, dtype
        self.row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1

    def __len__(self):
        return self.shape[0] if self.shape else 1

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(len(self))
        n = max(0, stop - start)
        self.handle.seek(self.offset + start * self.row * self.dtype.itemsize)
        data = self.handle.read(n * self.row * self.dtype.itemsize)
        if len(data) != n * self.row * self.dtype.itemsize:
            raise InputError(f"{self.name} is truncated: rows {start}..{stop} are not all there",
                             "write the source file again")
        return np.frombuffer(data, dtype=self.dtype).reshape((n, *self.shape[1:]))


def _blocks_from_arrays(get, names, source: str, count: int | None, chunk: int) -> Iterator[dict]:
    """Yield dicts of array slices of at most ``chunk`` galaxies; ``get(name, start, stop)`` reads a slice."""
    fields = {f: _pick(names, f, source, f in ("images", "magnitudes")) for f in _ALIASES}
    n = count if count is not None else len(names[fields["images"]])  # a length, not a read of the array
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        yield {f: (get(name, start, stop) if name else None) for f, name in fields.items()}, start, stop


def _check_block(block: dict, source: str, start: int, id_offset: int) -> Galaxies:
    images = np.asarray(block["images"])
    n = images.shape[0]
    if images.shape[1:] != IMAGE_SHAPE:
        if images.ndim == 4 and images.shape[1:] == (5, 64, 64):
            images = images[:, :, 16:48, 16:48]  # the model sees the centre 32x32 of 64x64 cutouts
        else:
            raise InputError(f"{source}: images have shape {list(images.shape)}, expected [N, 5, 32, 32]",
                             "bands first (u, g, r, i, z), centre-cropped to 32x32")
    mags = np.asarray(block["magnitudes"])
    if mags.shape != (n, 5):
        raise InputError(f"{source}: magnitudes have shape {list(mags.shape)}, expected [{n}, 5]",
                         "five magnitudes u, g, r, i, z per galaxy")
    z = block["redshifts"]
    z = np.full(n, np.nan, np.float32) if z is None else np.asarray(z, np.float32).reshape(-1)
    ids = block["object_id"]
    ids = np.arange(id_offset + start + 1, id_offset + start + n + 1) if ids is None else np.asarray(ids)
    if z.shape != (n,) or ids.shape[0] != n:
        raise InputError(f"{source}: redshifts or ids do not number {n} galaxies")
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{source}: object ids are {ids.dtype}, expected integers", "SDSS objIDs are int64")
    return Galaxies(images.astype(np.float32, copy=False), mags.astype(np.float64, copy=False), z,
                    ids.astype(np.int64, copy=False))


def read_source(path: str, chunk: int = 2048, id_offset: int = 0, render_seed: int = 1) -> Iterator[Galaxies]:
    """Stream galaxies from one source file in blocks of at most ``chunk``.

    Accepted: ``.npz``, a folder of ``.npy`` files, ``.h5``/``.hdf5`` (all three read a block
    at a time), the authors' ``TensorDataset`` ``.pt`` (read whole: it is one pickle, parsed
    without executing its code), a CAI partition, and an SDSS_MGS-style catalog (``.train``, ``.test``, ``.txt``),
    rendered on the fly by ``cai render``'s code.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such source {path}", "give a .npz, .h5, .pt, a folder of .npy or a catalog")
    suffix = p.suffix.lower()
    # the source's files stay open while its blocks stream, and close when the stream ends or is dropped
    with contextlib.ExitStack() as opened:
        if p.is_dir():
            files = {f.stem: f for f in sorted(p.glob("*.npy"))}
            if not files:
                raise InputError(f"folder {path} holds no .npy files", "expected images.npy, magnitudes.npy, ...")
            arrays = {k: _NpyArray(opened.enter_context(open(f, "rb")), str(f)) for k, f in files.items()}
            blocks = _blocks_from_arrays(lambda k, a, b: arrays[k][a:b], arrays, path, None, chunk)
        elif suffix == ".npz":
            try:
                archive = opened.enter_context(zipfile.ZipFile(p))
            except zipfile.BadZipFile:
                raise InputError(f"{path} is not a readable .npz (not a zip archive)",
                                 "write it again with np.savez") from None
            arrays = {name[:-4]: _NpyArray(opened.enter_context(archive.open(name)), f"{path}:{name}")
                      for name in archive.namelist() if name.endswith(".npy")}
            blocks = _blocks_from_arrays(lambda k, a, b: arrays[k][a:b], arrays, path, None, chunk)
        elif suffix in (".h5", ".hdf5"):
            import h5py

            handle = opened.enter_context(h5py.File(p, "r"))
            blocks = _blocks_from_arrays(lambda k, a, b: handle[k][a:b], handle, path, None, chunk)
        elif suffix == ".pt":
            from cai.model.pickle_safe import load_pt, tensor_dataset_arrays

            tensors = tensor_dataset_arrays(load_pt(str(p)))
            if len(tensors) < 2:
                raise InputError(f"{path} holds {len(tensors)} tensors, expected images, magnitudes[, redshifts]")
            arrays = dict(zip(("images", "magnitudes", "redshifts"), tensors))
            blocks = _blocks_from_arrays(lambda k, a, b: arrays[k][a:b], arrays, path, None, chunk)
        elif suffix == SUFFIX:
            galaxies = decode(p.read_bytes(), str(p))
            yield from (galaxies.slice(i, i + chunk) for i in range(0, len(galaxies), chunk))
            return
        elif suffix in (".train", ".test", ".txt", ".cat", ".dat"):
            from cai.catalog import read_sdss_mgs
            from cai.render import render_catalog

            catalog = read_sdss_mgs(str(p))
            for start in range(0, len(catalog["object_id"]), chunk):
                part = {k: v[start:start + chunk] for k, v in catalog.items()}
                r = render_catalog(part, seed=render_seed + start)
                yield Galaxies(r["images"], r["magnitudes"], r["redshifts"], r["object_id"])
            return
        else:
            raise InputError(f"unknown source type {p.name}",
                             "give a .npz, .h5/.hdf5, .pt, .safetensors, a folder of .npy or an SDSS_MGS catalog")
        for block, start, _ in blocks:
            yield _check_block(block, path, start, id_offset)


# --- partitioning ----------------------------------------------------------------------------

def partition_name(index: int) -> str:
    # fixed width keeps text order equal to numeric order for any reader
    return f"part-{index:05d}{SUFFIX}"


def write_partitions(sources: Iterable[str], store, prefix: str, size_mb: float,
                     galaxies_per_part: int | None = None, progress=None) -> dict:
    """Stream ``sources`` into partitions under ``prefix`` of ``store``; return the manifest.

    Memory holds at most one partition plus one source block, whatever the dataset's size.
    """
    sources = list(sources)
    per_part = galaxies_per_part or galaxies_per_partition(size_mb)
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    entries, pending, held, total, offset = [], [], 0, 0, 0

    def flush(blocks):
        galaxies = Galaxies.concat(blocks)
        data = encode(galaxies, {"partition": len(entries) + 1})
        key = prefix + partition_name(len(entries) + 1)
        store.put(key, data)
        entries.append({"key": partition_name(len(entries) + 1), "galaxies": len(galaxies),
                        "bytes": len(data), "sha256": sha256(data),
                        "labelled": int(np.isfinite(galaxies.redshifts).sum())})
        if progress:
            progress(len(galaxies))

    for source in sources:
        source_total = 0
        for block in read_source(source, id_offset=offset):
            source_total += len(block)
            while len(block):
                take = min(per_part - held, len(block))
                pending.append(block.slice(0, take))
                held += take
                block = block.slice(take, len(block))
                if held == per_part:
                    flush(pending)
                    total += held
                    pending, held = [], 0
        offset += source_total
    if held:
        flush(pending)
        total += held
    if not entries:
        raise InputError("the sources hold no galaxies", "check the input files")
    manifest = {"format": "cai-manifest", "version": FORMAT_VERSION, "galaxies": total,
                "galaxies_per_partition": per_part, "size_mb": size_mb,
                "sources": [os.path.basename(str(s)) for s in sources], "partitions": entries}
    store.put(prefix + MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest

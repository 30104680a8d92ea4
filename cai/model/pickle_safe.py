"""Read torch pickles (``torch.save`` files) without running them and without torch.

The official AstroMAE checkpoint is a whole pickled ``DataParallel`` and the
authors' partitions are pickled ``TensorDataset``s. ``torch.load`` on either
executes whatever the pickle asks for and needs the authors' source tree.
Here a ``pickle.Unpickler`` resolves globals only through an allow-list:

- tensor rebuild functions become numpy builders (tensors come back as
  ``np.ndarray`` copies of the stored bytes);
- model, layer and dataset classes become inert placeholders that record
  their pickled state and never call anything;
- a few harmless builtins (``set``, ``OrderedDict``, ...) are themselves,
  and numpy scalars and arrays (no object dtype) are rebuilt by checked
  wrappers.

Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``)
raises :class:`~cai.errors.UnsafePickleError` before anything is called.

Both ``torch.save`` layouts are read: the zip archive (torch >= 1.6:
``<name>/data.pkl`` plus one ``<name>/data/<key>`` file per storage) and the
legacy stream (magic number, protocol, system info, the object, the storage
keys, then each storage as an int64 element count and its raw bytes).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from cai.errors import UnsafePickleError, WeightsError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# storage class name -> numpy dtype of its elements; "bfloat16" is widened later
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "UntypedStorage": np.dtype("u1"),
}

# the authors' model classes: their import paths must resolve, but only to placeholders
OFFICIAL_CLASSES = frozenset({
    "blocks.model_vit_inception.ViT_Astro",
    "blocks.photoz.Input_Mix_Model",
    "blocks.photoz.InceptionBlock",
    "blocks.photoz.ConvBlock",
    "NormalCell.NormalCell",
    "NormalCell.Attention",
    "NormalCell.Mlp",
    "timm.models.layers.patch_embed.PatchEmbed",
    "timm.models.layers.drop.DropPath",
    "timm.layers.patch_embed.PatchEmbed",
    "timm.layers.drop.DropPath",
})

# this project's own classes, for pickles made from cai.model.astromae
PROJECT_CLASSES = frozenset(f"cai.model.astromae.{name}" for name in (
    "AstroMAE", "PatchEmbed", "Attention", "Mlp", "NormalCell", "ConvBlock", "InceptionBlock", "InputMixModel"))

# other inert containers a pickled module or dataset refers to
_OTHER_PLACEHOLDERS = frozenset({
    "torch.nn.parallel.data_parallel.DataParallel",
    "torch.nn.parallel.distributed.DistributedDataParallel",
    "torch.utils.data.dataset.TensorDataset",
    "torch.device",
    "functools.partial",
})

# module prefixes whose classes are all plain layers (Linear, Conv2d, GELU, ...)
_LAYER_PREFIXES = ("torch.nn.modules.",)


class StorageType:
    """Stands for ``torch.FloatStorage`` etc. inside persistent ids."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self):
        return f"StorageType({self.name})"


class Placeholder:
    """An inert stand-in for a pickled class instance.

    ``pickled_class`` is the dotted path the pickle named; ``state`` is what
    the pickle handed to ``__setstate__`` (for an ``nn.Module``, its
    ``__dict__`` with ``_parameters``, ``_buffers`` and ``_modules``).
    Attribute access falls through to ``state`` so trees read naturally.
    """

    pickled_class = "?"

    def __init__(self, *args, **kwargs):
        # reached by REDUCE (e.g. torch.device('cuda', 0)): record, never act
        self.args = args
        self.kwargs = kwargs
        self.state = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:
            # (dict state, slots state) from objects with __slots__
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        self.state = state if isinstance(state, dict) else {"_state": state}

    def __getattr__(self, name):
        state = self.__dict__.get("state")
        if state is not None and name in state:
            return state[name]
        raise AttributeError(f"{self.pickled_class} placeholder has no {name!r}")

    def __repr__(self):
        return f"<placeholder {self.pickled_class}>"


_placeholder_classes: dict[str, type] = {}


def _placeholder_for(path: str) -> type:
    # one class per path, so memoised references and isinstance checks agree
    cls = _placeholder_classes.get(path)
    if cls is None:
        cls = type(path.rsplit(".", 1)[-1], (Placeholder,), {"pickled_class": path})
        _placeholder_classes[path] = cls
    return cls


class _Storage:
    """Raw bytes of one storage and their element dtype."""

    def __init__(self, data: bytes | None, dtype: np.dtype, byteorder: str = "little", bfloat16: bool = False):
        self.data = data
        self.dtype = dtype if byteorder == "little" else dtype.newbyteorder(">")
        self.bfloat16 = bfloat16  # stored as uint16 bit patterns; numpy has no bfloat16


def _as_array(storage, offset, size, stride) -> np.ndarray | None:
    """A copy of the tensor that views ``storage`` at element ``offset`` with ``size``/``stride``."""
    if not isinstance(storage, _Storage):
        raise WeightsError("a tensor in the pickle has no storage", "the file is corrupt or not a torch.save file")
    if storage.data is None:
        return None  # first pass over a legacy file: bytes not read yet
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    flat = np.frombuffer(storage.data, dtype=storage.dtype)
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else offset
    if needed > flat.size:
        raise WeightsError(
            f"a tensor of shape {size} needs {needed} elements but its storage holds {flat.size}",
            "the file is truncated or corrupt")
    itemsize = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
    array = np.array(view, dtype=storage.dtype.newbyteorder("="), copy=True)
    if storage.bfloat16:
        # bfloat16 is the top half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _as_array(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride):
    return _as_array(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    # tensor subclasses: only our own rebuilders may be the inner function
    if func not in (_rebuild_tensor_v2, _rebuild_tensor, _rebuild_parameter):
        raise UnsafePickleError(f"a tensor subclass asked to be rebuilt by {func!r}", "nothing was run")
    return func(*args)


def _reconstructor(cls, base, state):
    # copyreg._reconstructor for protocol-0/1 objects; only placeholders may be built
    if not (isinstance(cls, type) and issubclass(cls, Placeholder)):
        raise UnsafePickleError(f"copyreg._reconstructor asked to build {cls!r}", "nothing was run")
    return cls.__new__(cls)


def _codecs_encode(text, encoding="utf-8", errors="strict"):
    # protocol 2 stores bytes as _codecs.encode(str, "latin1"); allow only that use
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r}", "nothing was run")
    return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
    # numpy scalars pickled as module attributes (e.g. a float from np.linspace)
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError(f"a numpy scalar of dtype {dtype!r}", "nothing was run")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_reconstruct(subtype, shape, dtype_code):
    # numpy arrays pickled as attributes: an empty base array that BUILD then fills
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"numpy _reconstruct of {subtype!r}", "nothing was run")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


class _Marker:
    """Names a type (``builtins.object``, ``torch.Tensor``) without being it."""

    def __init__(self, path):
        self.path = path


_FUNCTIONS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "copyreg._reconstructor": _reconstructor,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.slice": slice,
    "builtins.complex": complex,
    "torch.Size": tuple,
    "_codecs.encode": _codecs_encode,
    "numpy.dtype": np.dtype,
    "numpy.ndarray": np.ndarray,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
    "builtins.object": _Marker("builtins.object"),
    "torch.Tensor": _Marker("torch.Tensor"),
    "torch._tensor.Tensor": _Marker("torch.Tensor"),
    "torch.nn.parameter.Parameter": _Marker("torch.nn.parameter.Parameter"),
}

_TORCH_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                 "uint8", "bool", "float", "double", "half", "long", "int")


def resolve_global(module: str, name: str):
    """What the restricted unpickler hands back for ``module.name``; refuses anything unlisted."""
    module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)  # protocol-2 aliases
    path = f"{module}.{name}"
    if path in _FUNCTIONS:
        return _FUNCTIONS[path]
    if module == "torch" and name in _STORAGE_DTYPES:
        return StorageType(name)
    if path in ("torch.storage.UntypedStorage", "torch.storage.TypedStorage"):
        return StorageType("UntypedStorage")
    if module == "torch" and name in _TORCH_DTYPES:
        return f"torch.{name}"  # a dtype stored as a module attribute: keep its name only
    if path in OFFICIAL_CLASSES or path in PROJECT_CLASSES or path in _OTHER_PLACEHOLDERS:
        return _placeholder_for(path)
    if module.startswith(_LAYER_PREFIXES) and name[:1].isupper() and "." not in name:
        return _placeholder_for(path)
    raise UnsafePickleError(
        f"the pickle asks for {path}, which is not on the allow-list; nothing was run",
        "only torch tensors, torch.nn layers, DataParallel, TensorDataset and the AstroMAE "
        "classes are accepted; if this file should load, report which global it needs")


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose globals come only from :func:`resolve_global`."""

    def __init__(self, file, storages=None, byteorder="little"):
        super().__init__(file)
        self._storages = storages  # key -> bytes, or a callable key -> bytes
        self._byteorder = byteorder
        self.storage_specs: dict[str, tuple[StorageType, int]] = {}

    def find_class(self, module, name):
        return resolve_global(module, name)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise UnsafePickleError(f"unexpected persistent id {pid!r}; nothing was run",
                                    "the file is not a torch.save file")
        if pid[0] == "module":
            return pid[1]  # legacy files name a module's class with its source; ignore the source
        if pid[0] != "storage" or len(pid) < 5 or not isinstance(pid[1], StorageType):
            raise UnsafePickleError(f"unexpected persistent id {pid[:2]!r}; nothing was run",
                                    "the file is not a torch.save file")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        view = pid[5] if len(pid) > 5 else None
        self.storage_specs[key] = (storage_type, numel)
        data = self._storage_bytes(key)
        if data is not None and view is not None:
            # legacy storage views: (view_key, element offset, element count)
            _, start, count = view
            width = storage_type.dtype.itemsize
            data = data[int(start) * width:(int(start) + int(count)) * width]
        return _Storage(data, storage_type.dtype, self._byteorder, bfloat16=storage_type.name == "BFloat16Storage")

    def _storage_bytes(self, key):
        if self._storages is None:
            return None
        if callable(self._storages):
            return self._storages(key)
        if key not in self._storages:
            raise WeightsError(f"storage {key} is referenced but missing", "the file is truncated or corrupt")
        return self._storages[key]


def _restricted_load(stream, **kwargs):
    unpickler = RestrictedUnpickler(stream, **kwargs)
    try:
        return unpickler.load(), unpickler
    except (UnsafePickleError, WeightsError):
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, MemoryError) as exc:
        raise WeightsError(f"cannot unpickle: {exc}",
                           "the file is truncated, corrupt or not a torch.save file") from exc


def _load_zip(archive: zipfile.ZipFile):
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise WeightsError("zip file has no single <name>/data.pkl", "this is not a torch.save file")
    root = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if root + "byteorder" in names:
        byteorder = archive.read(root + "byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise WeightsError(f"unknown byte order {byteorder!r}", "the file is corrupt")

    def storage(key):
        try:
            return archive.read(f"{root}data/{key}")
        except KeyError:
            raise WeightsError(f"storage data/{key} is missing from the archive",
                               "the file is truncated or corrupt") from None

    tree, _ = _restricted_load(io.BytesIO(archive.read(pickles[0])), storages=storage, byteorder=byteorder)
    return tree


def _load_stream(stream: io.BufferedIOBase):
    first, _ = _restricted_load(stream)
    if first != LEGACY_MAGIC:
        return first  # a plain pickle, already read through the allow-list
    protocol, _ = _restricted_load(stream)
    if protocol != LEGACY_PROTOCOL:
        raise WeightsError(f"legacy torch file with protocol {protocol!r}", f"only protocol {LEGACY_PROTOCOL} is known")
    info, _ = _restricted_load(stream)
    byteorder = "little" if not isinstance(info, dict) or info.get("little_endian", True) else "big"

    # pass 1 learns the storages (their bytes follow the object); pass 2 builds the tensors
    start = stream.tell()
    _, dry = _restricted_load(stream, byteorder=byteorder)
    keys, _ = _restricted_load(stream)
    storages = {}
    for key in keys:
        storage_type, _numel = dry.storage_specs.get(str(key), (None, 0))
        if storage_type is None:
            raise WeightsError(f"storage {key} is listed but never used", "the file is corrupt")
        header = stream.read(8)
        if len(header) != 8:
            raise WeightsError("legacy torch file ends inside its storages", "the file is truncated")
        count = int.from_bytes(header, byteorder, signed=True)
        nbytes = count * storage_type.dtype.itemsize
        data = stream.read(nbytes)
        if len(data) != nbytes:
            raise WeightsError("legacy torch file ends inside its storages", "the file is truncated")
        storages[str(key)] = data
    stream.seek(start)
    tree, _ = _restricted_load(stream, storages=storages, byteorder=byteorder)
    return tree


def load_pt(source: str | os.PathLike | bytes) -> object:
    """Unpickle a ``torch.save`` file (zip or legacy) or a plain pickle, without running it.

    Returns the object tree: tensors as numpy arrays, classes as
    :class:`Placeholder` instances. Raises :class:`UnsafePickleError` for a
    global outside the allow-list and :class:`WeightsError` for a missing,
    truncated or malformed file.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        raw = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise WeightsError(f"no such file: {path}", "check the path to the checkpoint")
        raw = path.read_bytes()
    if not raw:
        raise WeightsError("the file is empty", "the download or copy was cut short")
    stream = io.BytesIO(raw)
    if zipfile.is_zipfile(stream):
        try:
            with zipfile.ZipFile(stream) as archive:
                return _load_zip(archive)
        except zipfile.BadZipFile as exc:
            raise WeightsError(f"broken zip archive: {exc}", "the file is truncated or corrupt") from exc
    stream.seek(0)
    return _load_stream(stream)


def is_placeholder(obj, path: str | None = None) -> bool:
    return isinstance(obj, Placeholder) and (path is None or obj.pickled_class == path)


def _module_tensors(module, prefix, out):
    state = module.state
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if value is None or (kind == "_buffers" and name in skip):
                continue
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            # a module registered twice (conv2d_init, vis_inception.0) is one memoised object: emit both names
            _module_tensors(child, f"{prefix}{name}.", out)


def state_dict_from_checkpoint(tree) -> dict[str, np.ndarray]:
    """The flat state dict of a pickled model (or wrapper, or state dict), ``module.`` stripped.

    Accepts a placeholder ``nn.Module`` (DataParallel or not), a state dict,
    or a dict holding one under ``model``/``state_dict``.
    """
    if isinstance(tree, Placeholder):
        if tree.pickled_class.startswith("torch.nn.parallel."):
            tree = (tree.state.get("_modules") or {}).get("module")
            if not isinstance(tree, Placeholder):
                raise WeightsError("the DataParallel wrapper holds no module", "the checkpoint is incomplete")
        if "_modules" not in tree.state:
            raise WeightsError(f"{tree.pickled_class} is not a pickled torch module",
                               "pass a checkpoint of the model itself")
        flat: dict[str, np.ndarray] = {}
        _module_tensors(tree, "", flat)
    elif isinstance(tree, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in tree and not isinstance(tree[key], np.ndarray):
                return state_dict_from_checkpoint(tree[key])
        flat = dict(tree)
    else:
        raise WeightsError(f"the pickle holds a {type(tree).__name__}, not a model or state dict",
                           "pass the official checkpoint or a state dict")
    bad = [k for k, v in flat.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise WeightsError(f"entries that are not tensors: {', '.join(map(str, bad[:5]))}",
                           "the file is not a model checkpoint")
    if flat and all(k.startswith("module.") for k in flat):
        flat = {k[len("module."):]: v for k, v in flat.items()}
    return flat


def tensor_dataset_arrays(tree) -> list[np.ndarray]:
    """The arrays of a pickled ``torch.utils.data.TensorDataset`` (its ``.tensors``), in order."""
    if not is_placeholder(tree, "torch.utils.data.dataset.TensorDataset"):
        kind = tree.pickled_class if isinstance(tree, Placeholder) else type(tree).__name__
        raise WeightsError(f"expected a pickled TensorDataset, found {kind}",
                           "partitions are torch.save(TensorDataset(images, magnitudes, redshifts)) files")
    tensors = tree.state.get("tensors")
    if not isinstance(tensors, (tuple, list)) or not all(isinstance(t, np.ndarray) for t in tensors):
        raise WeightsError("the TensorDataset holds no tensors", "the file is truncated or corrupt")
    return list(tensors)


def convert_checkpoint(src, out, dtype: str = "float32", metadata: dict | None = None) -> Path:
    """Official pickled checkpoint -> project safetensors weights, without running the pickle.

    The key set and shapes are checked against AstroMAE's before writing.
    Needs torch only to know AstroMAE's shapes (through ``weights``).
    """
    from cai.model import weights

    flat = state_dict_from_checkpoint(load_pt(src))
    weights.check_state_dict({k: tuple(v.shape) for k, v in flat.items()}, source=str(src))
    meta = {"source": Path(src).name if not isinstance(src, (bytes, bytearray)) else "bytes",
            "converted_by": "cai convert"}
    meta.update(metadata or {})
    meta.setdefault("model_version", "astromae-official")
    weights.save_weights(flat, out, dtype=dtype, metadata=meta)
    return Path(out)

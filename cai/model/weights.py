"""The project's weight format: one safetensors file, official state-dict names.

Keys are exactly the names of ``AstroMAE().state_dict()`` (the authors'
names without DataParallel's ``module.``); floats are float16 or float32,
``num_batches_tracked`` stays int64. The header metadata holds
``format = "cai-astromae"``, ``model_version`` and any free string keys.

Unlike a pickle, a safetensors file cannot run code when read, and its
numpy reader (:func:`read_weights_numpy`) does not need torch.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from cai.errors import WeightsError

FORMAT = "cai-astromae"
DTYPES = ("float16", "float32")


def _open_error(path: Path, exc: Exception) -> WeightsError:
    return WeightsError(f"cannot read weights {path}: {exc}",
                        "the file is truncated or corrupt; copy it again or re-run `cai convert`")


def _check_path(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"no such weights file: {path}",
                           "check the path, or create weights with `cai convert` or `cai train`")
    return path


def save_weights(state_dict, path, dtype: str = "float16", metadata: dict | None = None,
                 version_prefix: str = "astromae") -> Path:
    """Write a state dict (torch tensors or numpy arrays) as project weights.

    Floats are cast to ``dtype``; integers (``num_batches_tracked``) keep
    their type. ``metadata`` values are stored as strings; ``model_version``
    defaults to ``version_prefix`` and a hash of the tensors, so the same
    weights always get the same version. The file is written atomically.
    """
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise WeightsError(f"unknown weights dtype {dtype!r}", f"use one of {', '.join(DTYPES)}")
    arrays = {}
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        if hasattr(value, "detach"):  # torch tensor; avoid importing torch for numpy input
            value = value.detach().cpu().numpy()
        value = np.asarray(value)
        if value.dtype.kind == "f":
            with np.errstate(over="ignore"):  # overflow is reported below, with the tensor's name
                cast = value.astype(dtype)
            if not np.isfinite(cast).all() and np.isfinite(value).all():
                raise WeightsError(f"{name} overflows {dtype}", "save the weights as float32")
            value = cast
        arrays[name] = np.array(value, order="C")  # ascontiguousarray would make 0-d arrays 1-d
        digest.update(name.encode())
        digest.update(arrays[name].tobytes())

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta["format"] = FORMAT
    meta["dtype"] = dtype
    meta.setdefault("model_version", f"{version_prefix}-{digest.hexdigest()[:12]}")

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def read_weights_numpy(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Arrays (floats widened to float32) and metadata of a weights file; needs no torch.

    Checks the container and the ``format`` tag, not the names: the names
    are checked against the model in :func:`load_state_dict`.
    """
    from safetensors import SafetensorError, safe_open

    path = _check_path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
            _check_format(path, metadata)
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as exc:
        raise _open_error(path, exc) from exc
    except (OSError, ValueError) as exc:
        raise _open_error(path, exc) from exc
    arrays = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    return arrays, metadata


def read_metadata(path) -> dict[str, str]:
    """Only the header metadata of a weights file (cheap: tensors are not read)."""
    from safetensors import SafetensorError, safe_open

    path = _check_path(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise _open_error(path, exc) from exc
    _check_format(path, metadata)
    return metadata


def _check_format(path, metadata):
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path} is a safetensors file but not CAI AstroMAE weights "
                           f"(format={metadata.get('format')!r}, expected {FORMAT!r})",
                           "convert official checkpoints with `cai convert`")


@functools.lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Names and shapes of ``AstroMAE().state_dict()``, computed once."""
    import torch

    from cai.model.astromae import AstroMAE

    with torch.device("meta"):
        model = AstroMAE()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _few(names, n=5):
    names = sorted(names)
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_state_dict(shapes: dict[str, tuple[int, ...]], source: str = "weights") -> None:
    """Raise :class:`WeightsError` unless names and shapes are exactly AstroMAE's."""
    expected = expected_shapes()
    if shapes and all(k.startswith("module.") for k in shapes):
        raise WeightsError(f"{source}: every name starts with 'module.' (a DataParallel state dict)",
                           "strip the prefix, or convert the checkpoint with `cai convert`")
    missing = expected.keys() - shapes.keys()
    extra = shapes.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_few(missing)})")
    if extra:
        problems.append(f"{len(extra)} unexpected ({_few(extra)})")
    if problems:
        raise WeightsError(f"{source} does not match AstroMAE: " + "; ".join(problems),
                           "these are not pcm-AstroMAE weights, or were saved from another model version")
    wrong = [f"{k} is {shapes[k]}, expected {expected[k]}" for k in sorted(expected)
             if tuple(shapes[k]) != expected[k]]
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise WeightsError(f"{source} has wrong shapes: " + "; ".join(wrong[:5]) + more,
                           "these weights belong to a differently sized model")


def load_state_dict(path) -> dict:
    """Torch tensors (floats as float32) of a weights file, checked against AstroMAE's names and shapes."""
    import torch

    arrays, _ = read_weights_numpy(path)
    check_state_dict({k: tuple(v.shape) for k, v in arrays.items()}, source=str(path))
    # torch.from_numpy wants writable, contiguous memory; np.array keeps 0-d counters 0-d
    return {k: torch.from_numpy(v if v.flags.writeable and v.flags.c_contiguous else np.array(v, order="C"))
            for k, v in arrays.items()}


def load_model(path):
    """An :class:`AstroMAE` in eval mode with the file's weights (``strict=True``).

    ``model.model_version`` and ``model.weights_metadata`` carry the file's metadata.
    """
    from cai.model.astromae import AstroMAE

    state = load_state_dict(path)
    model = AstroMAE()
    model.load_state_dict(state, strict=True)
    model.eval()
    metadata = read_metadata(path)
    model.weights_metadata = metadata
    model.model_version = metadata.get("model_version", "unknown")
    return model


def file_sha256(path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

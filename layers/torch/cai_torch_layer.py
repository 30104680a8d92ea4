"""Unpack the PyTorch shipped compressed in CAI's torch layer into /tmp, once per container.

PyTorch's CPU build is ~500 MB even stripped, over Lambda's 250 MB unzipped limit for a function
and its layers, so the layer carries it as ``/opt/torch/torch.tar.zst`` (see docs/deploy.md).
Call :func:`ensure_torch` before ``import torch``; a warm container finds the tree already in
/tmp and only puts it on ``sys.path``.

Environment:
    CAI_TORCH_LAYER_ARCHIVE: the archive (set by serverless.yml when the layer is attached).
    CAI_TORCH_DIR: where to unpack (default /tmp/cai-torch); needs ~600 MB of ephemeral storage.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
from pathlib import Path

ARCHIVE_ENV = "CAI_TORCH_LAYER_ARCHIVE"
TARGET_ENV = "CAI_TORCH_DIR"
DEFAULT_TARGET = "/tmp/cai-torch"
_STAMP = ".cai-unpacked"


def ensure_torch(archive: str | os.PathLike | None = None,
                 target: str | os.PathLike | None = None) -> Path:
    """Unpack ``archive`` into ``target`` unless done already, and put ``target`` on ``sys.path``.

    Raises:
        FileNotFoundError: no archive given and ``CAI_TORCH_LAYER_ARCHIVE`` unset or missing.
    """
    archive = Path(archive or os.environ.get(ARCHIVE_ENV) or "")
    if not archive.is_file():
        raise FileNotFoundError(
            f"no PyTorch archive at {str(archive) or '(unset)'}: attach the torch layer "
            f"(sls deploy --param torch=true) or set {ARCHIVE_ENV}")
    target = Path(target or os.environ.get(TARGET_ENV, DEFAULT_TARGET))

    # name and size identify the archive: a new layer version means a new container anyway
    key = f"{archive.name} {archive.stat().st_size}\n"
    stamp = target / _STAMP
    if not (stamp.is_file() and stamp.read_text() == key):
        unpack(archive, target)
        stamp.write_text(key)
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    return target


def unpack(archive: Path, target: Path) -> None:
    """Stream-decompress ``archive`` into ``target``, replacing whatever was there."""
    import zstandard  # shipped uncompressed in the layer's python/

    # a half-written tree (timeout, full /tmp) must never look complete: unpack beside, then rename
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    with open(archive, "rb") as raw:
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_size=1 << 20)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            # the 'data' filter refuses absolute paths, links out of the tree and device files
            tar.extractall(partial, filter="data")
    os.replace(partial, target)

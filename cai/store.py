"""Where partitions, models and results live: a local folder or an S3 bucket.

Both stores offer the same small interface, so the pipeline never learns
where it runs. Listings are paginated (the prototype stopped at 1,000 keys)
and come back in natural order (part 2 before part 10).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from cai.errors import StoreError


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int


def natural_key(text: str):
    """Sort key that orders embedded numbers by value: 1, 2, 10, not 1, 10, 2."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


class LocalStore:
    """A folder standing in for a bucket; keys are paths below it (absolute paths are taken as they are)."""

    def __init__(self, root: str | os.PathLike = "."):
        self.root = Path(root).expanduser().resolve()
        self.name = str(self.root)

    def path(self, key: str) -> Path:
        return Path(key) if os.path.isabs(key) else self.root / key

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"no file {self.path(key)}", "check the path or prefix") from None
        except OSError as exc:
            raise StoreError(f"cannot read {self.path(key)}: {exc.strerror}") from None

    def put(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # write then rename, so a reader never sees half a file and a rerun overwrites cleanly
        partial = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        os.replace(partial, target)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def list(self, prefix: str) -> Iterator[StoredObject]:
        base = self.path(prefix)
        folder = base if prefix.endswith("/") or base.is_dir() else base.parent
        if not folder.is_dir():
            return iter(())
        found = []
        for path in folder.rglob("*"):
            if path.is_file() and not path.name.startswith(".") and str(path).startswith(str(base)):
                key = str(path) if os.path.isabs(prefix) else str(path.relative_to(self.root))
                found.append(StoredObject(key, path.stat().st_size))
        return iter(sorted(found, key=lambda o: natural_key(o.key)))

    def local_path(self, key: str, cache_dir: str | None = None) -> str:
        """A filesystem path for the object: here, the file itself."""
        if not self.exists(key):
            raise StoreError(f"no file {self.path(key)}", "check the model path")
        return str(self.path(key))

    def url(self, key: str) -> str:
        return str(self.path(key))


class S3Store:
    """An S3 bucket through boto3; the client honours AWS_ENDPOINT_URL_S3 (moto, LocalStack)."""

    def __init__(self, bucket: str, client=None):
        if client is None:
            import boto3  # only the S3 store needs it

            client = boto3.client("s3")
        self.client = client
        self.bucket = bucket
        self.name = f"s3://{bucket}"

    def _fail(self, exc, key: str, action: str) -> StoreError:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        hints = {
            "NoSuchBucket": "check the bucket name, and that the stack is deployed in this region",
            "NoSuchKey": "check the key or prefix; `cai upload` puts partitions and models in place",
            "404": "check the key or prefix",
            "AccessDenied": "the role may only touch the stack's own bucket",
            "403": "the role may only touch the stack's own bucket",
        }
        return StoreError(f"cannot {action} s3://{self.bucket}/{key}: {code}", hints.get(code, ""))

    def get(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore raises many classes; all become one named error
            raise self._fail(exc, key, "read") from exc

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except Exception as exc:
            raise self._fail(exc, key, "write") from exc

    def upload(self, path: str | os.PathLike, key: str) -> None:
        """A local file to ``key``, in parts when it is large (boto3's managed transfer)."""
        try:
            self.client.upload_file(str(path), self.bucket, key)
        except Exception as exc:  # boto3 wraps S3's answer in S3UploadFailedError; keep S3's code
            raise self._fail(exc.__cause__ or exc.__context__ or exc, key, f"upload {path} to") from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return True
        except Exception as exc:
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail(exc, key, "look up") from exc

    def list(self, prefix: str) -> Iterator[StoredObject]:
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                found.extend(StoredObject(o["Key"], o["Size"]) for o in page.get("Contents", ()))
        except Exception as exc:
            raise self._fail(exc, prefix, "list") from exc
        return iter(sorted(found, key=lambda o: natural_key(o.key)))

    def local_path(self, key: str, cache_dir: str | None = None) -> str:
        """Download once into ``cache_dir`` (Lambda: /tmp) and reuse while the file is there."""
        cache = Path(cache_dir or os.environ.get("CAI_MODEL_CACHE_DIR", "/tmp/cai-model"))
        target = cache / self.bucket / key
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            # unique per process and thread: executors sharing one /tmp must not share a partial file
            partial = target.with_name(f"{target.name}.{os.getpid()}-{threading.get_ident()}.part")
            try:
                self.client.download_file(self.bucket, key, str(partial))
            except Exception as exc:
                raise self._fail(exc, key, "download") from exc
            os.replace(partial, target)
        return str(target)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"


def split_location(location: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ("bucket", "prefix"); a folder -> ("", folder)."""
    if location.startswith("s3://"):
        bucket, _, prefix = location[5:].partition("/")
        if not bucket:
            raise StoreError(f"no bucket in {location!r}", "write s3://BUCKET/PREFIX")
        return bucket, prefix
    return "", location


def open_store(bucket: str, client=None):
    """The store behind a payload's ``bucket``: an S3 bucket name, or ``file://FOLDER`` / an absolute folder."""
    if bucket.startswith("file://"):
        return LocalStore(bucket[7:])
    if os.path.isabs(bucket) or bucket.startswith("."):
        return LocalStore(bucket)
    return S3Store(bucket, client)

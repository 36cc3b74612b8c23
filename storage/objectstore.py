"""Object store: one small interface, a local-directory backend and an S3 backend.

Adapters are stored content-addressed: a directory is packed into one deterministic tar,
and its key is `<namespace>/<sha256 of the tar>/adapter.tar`. A key therefore names exactly
one set of bytes forever, a re-upload of the same content is harmless, and every download
is checked against the hash in its own key.

Writes are atomic (local: temp file + fsync + rename; S3: one PUT with Content-MD5, which
the server verifies), and no user-supplied value can escape the store's root or prefix.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from storage.errors import InvalidRequest, OblivioError

_MAX_KEY = 1024
_SEGMENT = re.compile(r"^[A-Za-z0-9._=+@-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TAR_NAME = "adapter.tar"


class StoreUnavailable(OblivioError):
    """The object store cannot be reached (network, credentials, missing bucket)."""


class IntegrityError(OblivioError):
    """Stored bytes do not match their checksum: never use them."""


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


def validate_key(key: str) -> str:
    """A relative key of plain segments; anything that could traverse is refused."""
    if not isinstance(key, str) or not key:
        raise InvalidRequest("object key must be a non-empty string")
    if len(key) > _MAX_KEY:
        raise InvalidRequest(f"object key longer than {_MAX_KEY} characters")
    if key.startswith("/") or "\\" in key:
        raise InvalidRequest(f"object key {key!r} must be relative and use '/'")
    for segment in key.split("/"):
        if segment in ("", ".", "..") or not _SEGMENT.match(segment):
            raise InvalidRequest(f"object key {key!r} has an invalid segment {segment!r}")
    return key


class ObjectStore(Protocol):
    url: str

    def put_bytes(self, key: str, data: bytes) -> StoredObject: ...
    def get_bytes(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def ping(self) -> None: ...


class _DirectoryMixin:
    """Content-addressed directories on top of put_bytes/get_bytes (same for every backend)."""

    def put_file(self: Any, key: str, path: Path) -> StoredObject:
        return self.put_bytes(key, Path(path).read_bytes())

    def download_file(self: Any, key: str, dest: Path) -> Path:
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.part")
        tmp.write_bytes(self.get_bytes(key))
        tmp.replace(dest)
        return dest

    def put_directory_content_addressed(self: Any, local_dir: Path,
                                        namespace: str = "adapters") -> StoredObject:
        data = pack_directory(Path(local_dir))
        sha = hashlib.sha256(data).hexdigest()
        key = validate_key(f"{namespace}/{sha}/{_TAR_NAME}")
        stored = self.put_bytes(key, data)
        if stored.sha256 != sha:
            raise IntegrityError(f"stored {key} hashes to {stored.sha256}, expected {sha}")
        return stored

    def fetch_directory(self: Any, key: str, dest_dir: Path) -> Path:
        """Download, verify against the sha256 in the key, and unpack atomically to dest."""
        sha = _sha_from_key(key)
        data = self.get_bytes(key)
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha:
            raise IntegrityError(f"object {key} is corrupt: its bytes hash to {actual}")
        dest_dir = Path(dest_dir)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}-", dir=dest_dir.parent))
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
                tar.extractall(tmp, filter="data")  # refuses absolute paths, '..' and links
            if dest_dir.exists():
                shutil.rmtree(dest_dir)
            os.replace(tmp, dest_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest_dir


def _sha_from_key(key: str) -> str:
    parts = validate_key(key).split("/")
    if len(parts) < 3 or not _SHA256.match(parts[-2]):
        raise InvalidRequest(f"{key!r} is not a content-addressed key (<namespace>/<sha256>/...)")
    return parts[-2]


def pack_directory(local_dir: Path) -> bytes:
    """A byte-for-byte reproducible tar of the regular files under `local_dir`."""
    if not local_dir.is_dir():
        raise InvalidRequest(f"{local_dir} is not a directory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(local_dir.rglob("*")):
            rel = path.relative_to(local_dir).as_posix()
            if path.is_symlink():
                raise InvalidRequest(f"refusing to store a symlink: {rel}")
            if not path.is_file():
                continue
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o644
            info.mtime = 0  # no timestamps, owners or names: same content, same bytes
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    return buf.getvalue()


class LocalObjectStore(_DirectoryMixin):
    """Objects as files under a root directory (the embedded default)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        if self.root not in path.parents:
            raise InvalidRequest(f"object key {key!r} escapes the store")
        return path

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Temp names start with '.', which validate_key never produces, so `list` never
        # shows a half-written object.
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return StoredObject(key, hashlib.sha256(data).hexdigest(), len(data))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise KeyError(key)
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[str]:
        keys = []
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            if path.is_file() and not any(p.startswith(".") for p in rel.split("/")) \
                    and rel.startswith(prefix):
                keys.append(rel)
        return sorted(keys)

    def ping(self) -> None:
        if not os.access(self.root, os.W_OK):
            raise StoreUnavailable(f"object store directory {self.root} is not writable")


class S3ObjectStore(_DirectoryMixin):
    """Objects in an S3 bucket under a prefix (AWS, MinIO, R2, any S3-compatible server)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 region: str = "us-east-1", connect_timeout: float = 3.0,
                 max_attempts: int = 3) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(connect_timeout=connect_timeout, read_timeout=60,
                        retries={"max_attempts": max_attempts, "mode": "standard"},
                        s3={"addressing_style": "path" if endpoint_url else "auto"},
                        # Checksums are ours (Content-MD5 + sha256 keys); not every
                        # S3-compatible server speaks the newer flexible-checksum headers.
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required")
        self._s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=region,
                                aws_access_key_id=access_key_id,
                                aws_secret_access_key=secret_access_key, config=config)

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        md5 = hashlib.md5(data)  # noqa: S324 - integrity check demanded by the S3 protocol
        try:
            res = self._s3.put_object(Bucket=self.bucket, Key=self._key(key), Body=data,
                                      ContentMD5=base64.b64encode(md5.digest()).decode())
        except Exception as exc:
            raise _unavailable(exc, self.url) from exc
        etag = str(res.get("ETag", "")).strip('"')
        # A single-part PUT's ETag is the MD5 of what the server stored.
        if etag and etag != md5.hexdigest():
            raise IntegrityError(f"S3 stored {key} with ETag {etag}, expected {md5.hexdigest()}")
        return StoredObject(key, hashlib.sha256(data).hexdigest(), len(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            res = self._s3.get_object(Bucket=self.bucket, Key=self._key(key))
            return res["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            raise KeyError(key) from None
        except Exception as exc:
            raise _unavailable(exc, self.url) from exc

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise _unavailable(exc, self.url) from exc

    def delete(self, key: str) -> None:
        self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str = "") -> list[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        keys: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=full):
            for item in page.get("Contents", []):
                key = item["Key"]
                keys.append(key[len(self.prefix) + 1:] if self.prefix else key)
        return sorted(keys)

    def ping(self) -> None:
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise _unavailable(exc, self.url) from exc


def _unavailable(exc: Exception, url: str) -> OblivioError:
    if isinstance(exc, OblivioError):
        return exc
    return StoreUnavailable(f"object store {url} unavailable: {type(exc).__name__}: {exc}")


def open_object_store(url: str, *, endpoint_url: str | None = None,
                      access_key_id: str | None = None, secret_access_key: str | None = None,
                      region: str = "us-east-1") -> LocalObjectStore | S3ObjectStore:
    """`file:///abs/dir` or `s3://bucket/prefix` -> a store."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise InvalidRequest(f"file URL must be file:///absolute/path, got {url!r}")
        return LocalObjectStore(Path(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidRequest(f"S3 URL needs a bucket: s3://bucket/prefix, got {url!r}")
        return S3ObjectStore(parsed.netloc, parsed.path, endpoint_url=endpoint_url,
                             access_key_id=access_key_id, secret_access_key=secret_access_key,
                             region=region)
    raise InvalidRequest(f"unsupported object store URL {url!r}: use file:///dir or "
                         "s3://bucket/prefix")


def object_store_from_settings(settings: Any) -> LocalObjectStore | S3ObjectStore:
    return open_object_store(settings.resolved_object_store,
                             endpoint_url=settings.s3_endpoint_url,
                             access_key_id=settings.s3_access_key_id,
                             secret_access_key=settings.s3_secret_access_key,
                             region=settings.s3_region)

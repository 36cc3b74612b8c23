"""Object store: one small interface, a local-directory backend and an S3 backend.

    store = open_object_store("file:///var/lib/oblivio/objects")    # or "s3://bucket/prefix"
    stored = store.put_directory_content_addressed(adapter_dir)      # adapters/<sha256>/adapter.tar
    store.fetch_directory(stored.key, local_dir)                     # verified, then unpacked

Adapters are stored content-addressed: a directory is packed into one deterministic tar
(see `archive`) and its key is `<namespace>/<sha256 of the tar>/adapter.tar`. A key
therefore names exactly one set of bytes forever, storing the same content again is a
harmless overwrite with identical bytes, and every fetch checks the bytes against the hash
in the key before unpacking anything.

Writes are atomic and verified (local: temp file hashed while written + fsync + rename;
S3: one PUT with Content-MD5, which the server checks before storing). Every key passes
`validate_key`, so no user-supplied value can escape the store's root or prefix.

Errors: `InvalidRequest` (bad key or URL), `ObjectNotFound`, `CorruptObject` (checksum
mismatch, unsafe archive), `StoreUnavailable` (unreachable, credentials, missing bucket).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from storage.errors import InvalidRequest
from storage.objectstore.archive import ARCHIVE_NAME, pack_directory, unpack_archive
from storage.objectstore.base import (
    CorruptObject,
    ObjectNotFound,
    ObjectStore,
    StoredObject,
    StoreUnavailable,
    content_key,
    sha256_of_key,
    validate_key,
    validate_prefix,
)
from storage.objectstore.local import LocalObjectStore

if TYPE_CHECKING:
    from storage.objectstore.s3 import S3ObjectStore

__all__ = [
    "ARCHIVE_NAME", "CorruptObject", "LocalObjectStore", "ObjectNotFound", "ObjectStore",
    "S3ObjectStore", "StoreUnavailable", "StoredObject", "StoreConfig", "content_key",
    "open_object_store", "pack_directory", "sha256_of_key", "unpack_archive", "validate_key",
    "validate_prefix",
]


def open_object_store(url: str, *, endpoint_url: str | None = None,
                      access_key_id: str | None = None, secret_access_key: str | None = None,
                      region: str = "us-east-1", connect_timeout: float = 3.0,
                      max_attempts: int = 3) -> ObjectStore:
    """`file:///abs/dir` -> LocalObjectStore; `s3://bucket/prefix` -> S3ObjectStore.

    The S3 options apply to `s3://` only: `endpoint_url` for MinIO/R2/rclone (path-style
    addressing is used whenever it is set); credentials default to boto3's usual chain
    when None. `connect_timeout` (seconds) and `max_attempts` bound how long an
    unreachable server can stall a call.
    """
    parsed = urlparse(url or "")
    if parsed.scheme == "file":
        # Not percent-decoded: Settings builds these URLs from plain paths.
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise InvalidRequest(f"file URL must be file:///absolute/path, got {url!r}")
        return LocalObjectStore(Path(parsed.path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidRequest(f"S3 URL needs a bucket: s3://bucket/prefix, got {url!r}")
        from storage.objectstore.s3 import S3ObjectStore  # imports boto3

        return S3ObjectStore(parsed.netloc, parsed.path, endpoint_url=endpoint_url,
                             access_key_id=access_key_id, secret_access_key=secret_access_key,
                             region=region, connect_timeout=connect_timeout,
                             max_attempts=max_attempts)
    raise InvalidRequest(f"unsupported object store URL {url!r}: use file:///abs/dir or "
                         "s3://bucket/prefix")


@dataclass(frozen=True)
class StoreConfig:
    """Where versions are stored, as plain data (it travels to Ray workers).

    Args:
        url: `file:///abs/dir` or `s3://bucket/prefix`.
        endpoint_url: S3-compatible endpoint (MinIO, R2, rclone); None for AWS.
        access_key_id, secret_access_key: S3 credentials; None -> boto3's usual chain.
        region: S3 region.
    """

    url: str
    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str = "us-east-1"

    def open(self) -> ObjectStore:
        return open_object_store(self.url, endpoint_url=self.endpoint_url,
                                 access_key_id=self.access_key_id,
                                 secret_access_key=self.secret_access_key, region=self.region)

    def __repr__(self) -> str:  # never print the secret
        return f"StoreConfig(url={self.url!r}, endpoint_url={self.endpoint_url!r})"


def __getattr__(name: str) -> Any:
    # `from storage.objectstore import S3ObjectStore` works without importing boto3 for
    # everyone else.
    if name == "S3ObjectStore":
        from storage.objectstore.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""The object-store interface, the key rules, and content-addressed directories.

Everything here is the same for every backend; a backend only supplies the primitive
operations (`put_bytes`, `put_file`, `_chunks`, `exists`, `delete`, `list`, `ping`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from storage.errors import InvalidRequest, NotFound, OblivioError, Unavailable
from storage.objectstore.archive import ARCHIVE_NAME, pack_directory, unpack_archive

MAX_KEY_CHARS = 1024  # S3's limit (in bytes; keys here are ASCII, so also in characters)
MAX_SEGMENT_CHARS = 255  # a file name on every common filesystem
CHUNK_BYTES = 1 << 20
# Plain ASCII names only. No leading dot: names starting with '.' are the stores' own
# (temp files here, `.rclone_temp_*` in rclone), and it also rules out '.' and '..'.
_SEGMENT = re.compile(r"[A-Za-z0-9_=+@-][A-Za-z0-9._=+@-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class StoreUnavailable(Unavailable):
    """The object store cannot be reached or refuses us (network, credentials, bucket)."""


class CorruptObject(OblivioError):
    """Stored bytes do not match their checksum, or an archive holds unsafe entries."""


class ObjectNotFound(NotFound):
    """No object under this key."""


@dataclass(frozen=True)
class StoredObject:
    """What a successful, verified write stored."""

    key: str  # relative to the store's root / prefix
    sha256: str  # hex digest of the stored bytes
    size: int  # bytes


def validate_key(key: str) -> str:
    """Return `key` if it is a relative key of plain segments; InvalidRequest otherwise.

    Refuses everything that could traverse or alias: absolute keys, '.', '..', empty
    segments ('a//b'), backslashes, NUL and other control or non-ASCII characters, and
    keys or segments longer than the limits.
    """
    if not isinstance(key, str) or not key:
        raise InvalidRequest("object key must be a non-empty string")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(f"object key is longer than {MAX_KEY_CHARS} characters")
    if key.startswith("/") or "\\" in key:
        raise InvalidRequest(f"object key {key!r} must be relative and use '/' separators")
    for segment in key.split("/"):
        if len(segment) > MAX_SEGMENT_CHARS:
            raise InvalidRequest(f"object key {key!r} has a segment longer than "
                                 f"{MAX_SEGMENT_CHARS} characters")
        if not _SEGMENT.fullmatch(segment):
            raise InvalidRequest(
                f"object key {key!r} has an invalid segment {segment!r}: segments are "
                "non-empty, use only A-Z a-z 0-9 . _ = + @ - and do not start with '.'")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: '' (everything), a key, or a key followed by '/'."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        raise InvalidRequest("object key prefix must be a string")
    validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
    return prefix


def content_key(sha256: str, *, namespace: str = "adapters") -> str:
    """The key of a content-addressed directory archive: `<namespace>/<sha256>/adapter.tar`."""
    if not _SHA256.fullmatch(sha256):
        raise InvalidRequest(f"{sha256!r} is not a sha256 (64 lowercase hex characters)")
    return validate_key(f"{namespace}/{sha256}/{ARCHIVE_NAME}")


def sha256_of_key(key: str) -> str:
    """The sha256 that a content-addressed key promises for its bytes."""
    parts = validate_key(key).split("/")
    if len(parts) < 3 or not _SHA256.fullmatch(parts[-2]):
        raise InvalidRequest(f"{key!r} is not a content-addressed key "
                             "(<namespace>/<sha256>/<name>)")
    return parts[-2]


def check_sha256(key: str, *, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise CorruptObject(f"object {key!r} is corrupt: its bytes hash to sha256 {actual}, "
                            f"expected {expected}")


def spool(fd: int, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Write `chunks` to the open file `fd` (closed after) and fsync it.

    Returns (sha256 hex, size) of what was written, hashed on the way through.
    """
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as fh:
        for chunk in chunks:
            digest.update(chunk)
            fh.write(chunk)
            size += len(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return digest.hexdigest(), size


@runtime_checkable
class ObjectStore(Protocol):
    """Objects (bytes under keys) and content-addressed directories.

    Keys are relative, '/'-separated (see `validate_key`). Writes are atomic and verified:
    an object is visible whole or not at all. Reads given a `sha256` verify it and raise
    `CorruptObject` on mismatch. Missing keys raise `ObjectNotFound`; an unreachable store
    raises `StoreUnavailable`; bad keys raise `InvalidRequest`.
    """

    url: str

    def put_bytes(self, key: str, data: bytes) -> StoredObject: ...
    def put_file(self, key: str, path: Path) -> StoredObject: ...
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes: ...
    def download_file(self, key: str, dest: Path, *, sha256: str | None = None) -> Path: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def ping(self) -> None: ...
    def put_directory_content_addressed(self, local_dir: Path, *,
                                        namespace: str = "adapters") -> StoredObject: ...
    def fetch_directory(self, key_or_sha: str, dest_dir: Path, *,
                        namespace: str = "adapters") -> Path: ...


class StoreBase:
    """Reads, downloads and content-addressed directories, built on a backend's primitives."""

    url: str

    # --- supplied by each backend ---------------------------------------------------
    def _chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks; ObjectNotFound / StoreUnavailable on failure."""
        raise NotImplementedError

    def put_file(self, key: str, path: Path) -> StoredObject:
        raise NotImplementedError

    # --- shared ---------------------------------------------------------------------
    def get_bytes(self, key: str, *, sha256: str | None = None) -> bytes:
        """The object's bytes; with `sha256`, verified against it first."""
        digest = hashlib.sha256()
        parts = []
        for chunk in self._chunks(key):
            digest.update(chunk)
            parts.append(chunk)
        check_sha256(key, actual=digest.hexdigest(), expected=sha256)
        return b"".join(parts)

    def download_file(self, key: str, dest: Path, *, sha256: str | None = None) -> Path:
        """Download to `dest`, which appears only once complete (and verified, with `sha256`)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        try:
            actual, _size = spool(fd, self._chunks(key))
            check_sha256(key, actual=actual, expected=sha256)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return dest

    def put_directory_content_addressed(self, local_dir: Path, *,
                                        namespace: str = "adapters") -> StoredObject:
        """Store a directory as one deterministic tar under `<namespace>/<sha256>/adapter.tar`.

        The same files (names and bytes) give the same key whatever their timestamps,
        owners or creation order, so storing it again is a harmless, idempotent overwrite.
        """
        validate_key(namespace)
        with tempfile.TemporaryDirectory(prefix="oblivio-pack-") as tmp:
            archive = Path(tmp) / ARCHIVE_NAME
            sha = pack_directory(Path(local_dir), archive)
            stored = self.put_file(content_key(sha, namespace=namespace), archive)
        if stored.sha256 != sha:  # the archive changed between packing and upload
            raise CorruptObject(f"stored {stored.key} hashes to {stored.sha256}, expected {sha}")
        return stored

    def fetch_directory(self, key_or_sha: str, dest_dir: Path, *,
                        namespace: str = "adapters") -> Path:
        """Download a content-addressed directory, verify its sha256, unpack it to `dest_dir`.

        `key_or_sha` is a key from `put_directory_content_addressed` or just its sha256.
        `dest_dir` appears only once verified and fully unpacked (replacing what was there);
        on any failure it is left as it was.
        """
        if _SHA256.fullmatch(key_or_sha or ""):
            key = content_key(key_or_sha, namespace=namespace)
        else:
            key = validate_key(key_or_sha)
        sha = sha256_of_key(key)
        dest_dir = Path(dest_dir)
        dest_dir.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".part",
                                     dir=dest_dir.parent))
        try:
            archive = self.download_file(key, work / ARCHIVE_NAME, sha256=sha)
            tree = work / "tree"
            try:
                unpack_archive(archive, tree)
            except InvalidRequest as exc:
                raise CorruptObject(f"object {key!r}: {exc}") from exc
            if dest_dir.exists():
                shutil.rmtree(dest_dir)
            os.replace(tree, dest_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return dest_dir

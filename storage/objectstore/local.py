"""Objects as files under a root directory (the embedded default)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from storage.errors import Conflict, InvalidRequest
from storage.objectstore.base import (
    CHUNK_BYTES,
    ObjectNotFound,
    StoreBase,
    StoredObject,
    StoreUnavailable,
    spool,
    validate_key,
    validate_prefix,
)

_TEMP_PREFIX = ".tmp-"  # valid keys never start a segment with '.', so temps never list


class LocalObjectStore(StoreBase):
    """Each object is one file `<root>/<key>`.

    A write goes to a temp file in the target's directory, is hashed while written,
    fsynced, and renamed over the target (then the directory is fsynced), so readers see
    the old object or the whole new one, never part of it, even after a crash.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file://{self.root}"

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = (self.root / validate_key(key)).resolve()
        # validate_key already refuses '..'; this also catches symlinks inside the root
        # that point out of it.
        if self.root not in path.parents:
            raise InvalidRequest(f"object key {key!r} resolves outside the store")
        return path

    # --- writes -------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        return self._write(key, (data,))

    def put_file(self, key: str, path: Path) -> StoredObject:
        with open(path, "rb") as src:
            return self._write(key, iter(lambda: src.read(CHUNK_BYTES), b""))

    def _write(self, key: str, chunks: Iterable[bytes]) -> StoredObject:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=_TEMP_PREFIX, suffix=".part", dir=path.parent)
        except (FileExistsError, NotADirectoryError) as exc:
            raise Conflict(f"object key {key!r} clashes with an existing object that is a "
                           "prefix of it") from exc
        try:
            sha256, size = spool(fd, chunks)
            if path.is_dir():
                raise Conflict(f"object key {key!r} is a prefix of existing objects")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return StoredObject(key=key, sha256=sha256, size=size)

    def delete(self, key: str) -> None:
        path = self._path(key)
        if path.is_file():
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)

    # --- reads --------------------------------------------------------------------------
    def _chunks(self, key: str) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(f"no object {key!r} in {self.url}") from None
        with fh:
            while chunk := fh.read(CHUNK_BYTES):
                yield chunk

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix`, sorted; temp files of writes in flight never show."""
        validate_prefix(prefix)
        base_rel = prefix.rpartition("/")[0]
        base = self._path(base_rel) if base_rel else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):  # does not follow symlinks
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                if not name.startswith(".") and key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the root is a writable directory."""
        if not self.root.is_dir() or not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreUnavailable(f"object store directory {self.root} is missing or "
                                   "not writable")


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse fsync on a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

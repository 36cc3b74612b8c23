"""A deterministic tar of a directory, so that its sha256 can name it.

The archive holds only the directory's regular files, in order of their relative POSIX
path, each with mode 0644, mtime 0, uid/gid 0 and no owner names (PAX format). The same
file names and bytes therefore always give the same archive, byte for byte, whatever the
timestamps, owners or creation order. Empty directories are not kept; symlinks are
refused (they could point anywhere, and their target is not content).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

from storage.errors import InvalidRequest

ARCHIVE_NAME = "adapter.tar"
_CHUNK = 1 << 20


def pack_directory(local_dir: Path, dest: Path) -> str:
    """Write the archive of `local_dir` to `dest`; return its sha256 (hex)."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise InvalidRequest(f"{local_dir} is not a directory")
    files: list[tuple[str, Path]] = []
    for root, dirnames, filenames in os.walk(local_dir):  # does not follow symlinks
        for name in dirnames + filenames:
            path = Path(root) / name
            rel = path.relative_to(local_dir).as_posix()
            if path.is_symlink():
                raise InvalidRequest(f"refusing to store a symlink: {rel}")
            if name in filenames and path.is_file():
                files.append((rel, path))
    files.sort()  # by the relative path string: the same order on every platform/Python
    with tarfile.open(dest, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in files:
            with path.open("rb") as fh:
                info = tarfile.TarInfo(rel)
                info.size = os.fstat(fh.fileno()).st_size
                info.mode = 0o644
                info.mtime = 0
                tar.addfile(info, fh)
    return file_sha256(dest)


def unpack_archive(archive: Path, dest_dir: Path) -> None:
    """Unpack into `dest_dir` (created); InvalidRequest for anything but plain files/dirs."""
    try:
        with tarfile.open(archive, mode="r") as tar:
            for member in tar.getmembers():
                if not (member.isreg() or member.isdir()):
                    raise InvalidRequest(f"archive entry {member.name!r} is not a regular file")
            # The 'data' filter also refuses absolute names, '..' and anything that would
            # land outside dest_dir.
            Path(dest_dir).mkdir(parents=True)
            tar.extractall(dest_dir, filter="data")
    except tarfile.TarError as exc:
        raise InvalidRequest(f"unsafe or unreadable archive: {exc}") from exc


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()

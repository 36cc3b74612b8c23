"""The object store on both backends: a local directory and a real S3 server (rclone)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.errors import Conflict, InvalidRequest
from storage.objectstore import (
    ARCHIVE_NAME,
    CorruptObject,
    LocalObjectStore,
    ObjectNotFound,
    ObjectStore,
    StoreUnavailable,
    content_key,
    open_object_store,
)
from tests.fixtures.s3 import S3Server, free_port, s3_server  # noqa: F401 (fixture)

Tamper = Callable[[str, bytes], None]


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[ObjectStore, Tamper]:
    """A fresh, empty store, and a way to overwrite an object behind the store's back."""
    if request.param == "local":
        store = open_object_store(f"file://{tmp_path / 'objects'}")

        def tamper(key: str, data: bytes) -> None:
            (tmp_path / "objects" / key).write_bytes(data)

        return store, tamper
    server: S3Server = request.getfixturevalue("s3_server")
    prefix = f"t-{uuid.uuid4().hex}"  # one server for the session; a prefix per test
    store = open_object_store(server.url(prefix), **server.options())
    raw = server.client()

    def tamper_s3(key: str, data: bytes) -> None:
        raw.put_object(Bucket=server.bucket, Key=f"{prefix}/{key}", Body=data)

    return store, tamper_s3


@pytest.fixture
def store(backend: tuple[ObjectStore, Tamper]) -> ObjectStore:
    return backend[0]


def make_adapter_dir(path: Path, *, reverse: bool = False) -> Path:
    """A directory with nested, empty and binary files, created in either order."""
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": bytes(range(256)) * 64,
        "ranks/rank-0/state.bin": b"\x00\x01\x02" * 1000,
        "ranks/rank-1/empty": b"",
        "z/deep/er/still/file.txt": "ünïcode text\n".encode(),
    }
    for rel in sorted(files, reverse=reverse):
        target = path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[rel])
    return path


def tree(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes()
            for p in sorted(path.rglob("*")) if p.is_file()}


# --- plain objects ------------------------------------------------------------------------

def test_bytes_and_files_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)  # more than one read chunk
    stored = store.put_bytes("a/b/blob.bin", data)
    assert (stored.key, stored.sha256, stored.size) == (
        "a/b/blob.bin", hashlib.sha256(data).hexdigest(), len(data))
    assert store.get_bytes("a/b/blob.bin") == data
    assert store.get_bytes("a/b/blob.bin", sha256=stored.sha256) == data
    assert store.exists("a/b/blob.bin")
    assert not store.exists("a/b/other.bin")

    src = tmp_path / "src.bin"
    src.write_bytes(b"file contents")
    from_file = store.put_file("a/c.txt", src)
    assert from_file.sha256 == hashlib.sha256(b"file contents").hexdigest()
    dest = store.download_file("a/c.txt", tmp_path / "out" / "c.txt", sha256=from_file.sha256)
    assert dest.read_bytes() == b"file contents"
    assert sorted(os.listdir(tmp_path / "out")) == ["c.txt"]  # no .part left beside it

    store.put_bytes("other/x", b"x")
    assert store.list("a/") == ["a/b/blob.bin", "a/c.txt"]
    assert store.list("a/b") == ["a/b/blob.bin"]
    assert store.list() == ["a/b/blob.bin", "a/c.txt", "other/x"]
    assert store.list("nothing/") == []

    store.put_bytes("a/c.txt", b"replaced")  # overwrite
    assert store.get_bytes("a/c.txt") == b"replaced"

    store.delete("a/c.txt")
    store.delete("a/c.txt")  # deleting what is gone is not an error
    assert not store.exists("a/c.txt")
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a/c.txt")
    with pytest.raises(ObjectNotFound):
        store.download_file("a/c.txt", tmp_path / "gone.txt")
    assert not (tmp_path / "gone.txt").exists()
    assert store.list() == ["a/b/blob.bin", "other/x"]


def test_a_read_with_the_wrong_sha256_fails_and_writes_nothing(store: ObjectStore,
                                                                tmp_path: Path) -> None:
    store.put_bytes("k", b"payload")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(CorruptObject, match="corrupt"):
        store.get_bytes("k", sha256=wrong)
    with pytest.raises(CorruptObject):
        store.download_file("k", tmp_path / "dl" / "k", sha256=wrong)
    assert os.listdir(tmp_path / "dl") == []


# --- content-addressed directories ---------------------------------------------------------

def test_directory_round_trip_with_nested_files(store: ObjectStore, tmp_path: Path) -> None:
    src = make_adapter_dir(tmp_path / "adapter")
    stored = store.put_directory_content_addressed(src)
    sha = stored.sha256
    assert stored.key == f"adapters/{sha}/{ARCHIVE_NAME}"
    assert store.list("adapters/") == [stored.key]

    by_key = store.fetch_directory(stored.key, tmp_path / "fetched" / "by-key")
    assert tree(by_key) == tree(src)
    by_sha = store.fetch_directory(sha, tmp_path / "fetched" / "by-sha")
    assert tree(by_sha) == tree(src)
    # Fetching over an existing directory replaces it whole.
    (by_key / "stale.txt").write_text("left from before")
    store.fetch_directory(stored.key, by_key)
    assert tree(by_key) == tree(src)
    assert sorted(os.listdir(tmp_path / "fetched")) == ["by-key", "by-sha"]  # no temp dirs

    other_ns = store.put_directory_content_addressed(src, namespace="s3t/checkpoints")
    assert other_ns.key == f"s3t/checkpoints/{sha}/{ARCHIVE_NAME}"
    assert tree(store.fetch_directory(sha, tmp_path / "ns", namespace="s3t/checkpoints")) \
        == tree(src)


def test_same_content_same_key_and_storing_again_is_idempotent(store: ObjectStore,
                                                              tmp_path: Path) -> None:
    first = store.put_directory_content_addressed(make_adapter_dir(tmp_path / "one"))
    # Same names and bytes, created in the other order, with other timestamps and modes.
    copy = make_adapter_dir(tmp_path / "two", reverse=True)
    for path in copy.rglob("*"):
        if path.is_file():
            os.utime(path, (1_000_000, 1_000_000))
            path.chmod(0o600)
    second = store.put_directory_content_addressed(copy)
    again = store.put_directory_content_addressed(tmp_path / "one")
    assert first == second == again
    assert store.list() == [first.key]
    assert tree(store.fetch_directory(first.key, tmp_path / "back")) == tree(tmp_path / "one")

    (copy / "adapter_config.json").write_bytes(b'{"r": 16}')
    changed = store.put_directory_content_addressed(copy)
    assert changed.key != first.key
    assert store.list() == sorted([first.key, changed.key])


def test_fetch_fails_loudly_on_a_corrupted_object(backend: tuple[ObjectStore, Tamper],
                                                  tmp_path: Path) -> None:
    store, tamper = backend
    stored = store.put_directory_content_addressed(make_adapter_dir(tmp_path / "adapter"))
    good = store.get_bytes(stored.key)
    # One flipped byte in the middle, as bit rot or a bad copy would do.
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x01
    tamper(stored.key, bytes(bad))

    dest = tmp_path / "fetched" / "adapter"
    with pytest.raises(CorruptObject, match=stored.sha256):
        store.fetch_directory(stored.key, dest)
    with pytest.raises(CorruptObject):
        store.fetch_directory(stored.sha256, dest)
    assert not dest.exists()
    assert os.listdir(tmp_path / "fetched") == []  # no half-unpacked temp dir either

    # A directory that was already there stays as it was.
    dest.mkdir()
    (dest / "keep.txt").write_text("old")
    with pytest.raises(CorruptObject):
        store.fetch_directory(stored.key, dest)
    assert tree(dest) == {"keep.txt": b"old"}

    # Storing the content again heals the object.
    store.put_directory_content_addressed(tmp_path / "adapter")
    assert tree(store.fetch_directory(stored.key, tmp_path / "healed")) == \
        tree(tmp_path / "adapter")


def test_fetch_refuses_an_archive_that_would_write_outside_its_directory(
        store: ObjectStore, tmp_path: Path) -> None:
    # An archive with a matching sha256 but a '../' entry: the hash alone is not enough.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    data = buf.getvalue()
    key = content_key(hashlib.sha256(data).hexdigest())
    store.put_bytes(key, data)
    with pytest.raises(CorruptObject, match="escaped"):
        store.fetch_directory(key, tmp_path / "out" / "adapter")
    assert not (tmp_path / "out" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()
    assert os.listdir(tmp_path / "out") == []


def test_a_directory_with_a_symlink_is_refused(store: ObjectStore, tmp_path: Path) -> None:
    src = make_adapter_dir(tmp_path / "adapter")
    (src / "link").symlink_to("/etc/passwd")
    with pytest.raises(InvalidRequest, match="symlink"):
        store.put_directory_content_addressed(src)
    assert store.list() == []


def test_fetch_of_a_missing_adapter_is_not_found(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound):
        store.fetch_directory("0" * 64, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- atomic, verified writes ---------------------------------------------------------------

def test_many_writes_leave_no_temp_files_visible(store: ObjectStore, tmp_path: Path) -> None:
    expected = set()
    for i in range(20):
        key = f"batch/{i % 4}/obj-{i % 7}"
        store.put_bytes(key, os.urandom(100 + i))
        expected.add(key)
    store.put_directory_content_addressed(make_adapter_dir(tmp_path / "a"))
    listed = store.list("batch/")
    assert listed == sorted(expected)
    assert all(not part.startswith(".") for key in store.list() for part in key.split("/"))
    if isinstance(store, LocalObjectStore):
        on_disk = [p.name for p in store.root.rglob("*") if p.is_file()]
        assert not [n for n in on_disk if n.startswith(".")], on_disk


def test_local_write_that_dies_halfway_leaves_the_old_object(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("adapters/x", b"old, complete")

    def dying_writer():  # type: ignore[no-untyped-def]
        yield b"new, par"
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        store._write("adapters/x", dying_writer())
    assert store.get_bytes("adapters/x") == b"old, complete"
    assert store.list() == ["adapters/x"]
    assert os.listdir(tmp_path / "objects" / "adapters") == ["x"]  # temp file removed


def test_s3_upload_whose_bytes_do_not_match_their_checksum_stores_nothing(
        s3_server: S3Server) -> None:
    from storage.objectstore.s3 import S3ObjectStore

    store = open_object_store(s3_server.url(f"t-{uuid.uuid4().hex}"), **s3_server.options())
    assert isinstance(store, S3ObjectStore)
    store.put_bytes("adapters/kept", b"old, complete")
    sent = b"bytes damaged on the way"
    claimed_md5 = hashlib.md5(b"bytes as they were hashed", usedforsecurity=False).digest()
    for key in ("adapters/new", "adapters/kept"):
        # rclone refuses the PUT (BadDigest); moto stores it, and the ETag check removes it.
        with pytest.raises(CorruptObject):
            store._put(key, sent, md5=claimed_md5, sha256=hashlib.sha256(sent).hexdigest(),
                       size=len(sent))
    assert not store.exists("adapters/new")
    if s3_server.kind == "moto":
        # moto ignores Content-MD5: the bad PUT replaced the old object before the ETag
        # check caught it and took it back. Servers that check Content-MD5 (AWS, MinIO,
        # R2, rclone) refuse the PUT and keep the old object.
        assert store.list() == []
        return
    assert store.get_bytes("adapters/kept") == b"old, complete"
    assert store.list() == ["adapters/kept"]


def test_local_key_that_is_a_prefix_of_another_is_a_conflict(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    store.put_bytes("a/b", b"1")
    with pytest.raises(Conflict):
        store.put_bytes("a/b/c", b"2")
    with pytest.raises(Conflict):
        store.put_bytes("a", b"3")
    assert store.list() == ["a/b"]


# --- no traversal ---------------------------------------------------------------------------

BAD_KEYS = [
    "", "/etc/passwd", "../outside", "a/../../outside", "a/..", ".", "./a", "a//b", "a/",
    "a\\..\\b", "C:\\x", "a/\x00b", "a/.hidden", "a/b c", "a/\u00e9", "x" * 1025,
    "a/" + "y" * 256,
]


@pytest.mark.parametrize("key", BAD_KEYS, ids=lambda key: repr(key)[:24])
def test_traversal_and_malformed_keys_are_refused(store: ObjectStore, tmp_path: Path,
                                                  key: str) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"x")
    attempts: list[Callable[[], object]] = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, src),
        lambda: store.get_bytes(key),
        lambda: store.download_file(key, tmp_path / "dl"),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.fetch_directory(key, tmp_path / "dir"),
    ]
    for attempt in attempts:
        with pytest.raises(InvalidRequest):
            attempt()
    assert store.list() == []
    assert sorted(os.listdir(tmp_path)) in (["src"], ["objects", "src"])
    if isinstance(store, LocalObjectStore):
        assert not any(store.root.rglob("*"))


@pytest.mark.parametrize("prefix", ["/", "../", "a/../", "a\\", "a//", ".hidden/"])
def test_bad_list_prefixes_are_refused(store: ObjectStore, prefix: str) -> None:
    with pytest.raises(InvalidRequest):
        store.list(prefix)


@pytest.mark.parametrize("namespace", ["../x", "/abs", "a//b", ""])
def test_bad_namespaces_are_refused(store: ObjectStore, tmp_path: Path, namespace: str) -> None:
    src = make_adapter_dir(tmp_path / "adapter")
    with pytest.raises(InvalidRequest):
        store.put_directory_content_addressed(src, namespace=namespace)
    with pytest.raises(InvalidRequest):
        store.fetch_directory("a" * 64, tmp_path / "x", namespace=namespace)


def test_local_store_refuses_a_symlink_that_leads_out_of_its_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalObjectStore(tmp_path / "objects")
    (store.root / "adapters").symlink_to(outside)
    with pytest.raises(InvalidRequest, match="outside"):
        store.put_bytes("adapters/x", b"evil")
    with pytest.raises(InvalidRequest):
        store.list("adapters/")
    assert os.listdir(outside) == []


# --- opening, readiness ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["local", "s3"])
def test_ping_answers_while_the_store_is_there_and_fails_once_it_is_gone(
        kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    # Both halves on one store: a ping that checked nothing would pass the first alone.
    if kind == "local":
        store = LocalObjectStore(tmp_path / "objects")
        assert store.ping() is None
        store.root.rmdir()
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        bucket = f"ping-{uuid.uuid4().hex[:12]}"
        server.client().create_bucket(Bucket=bucket)
        store = open_object_store(f"s3://{bucket}/p", **server.options())
        assert store.ping() is None
        server.client().delete_bucket(Bucket=bucket)
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_ping_fails_quickly_for_an_unreachable_s3_endpoint() -> None:
    store = open_object_store("s3://oblivio-test/adapters",
                              endpoint_url=f"http://127.0.0.1:{free_port()}",
                              access_key_id="key", secret_access_key="secret",
                              connect_timeout=1.0, max_attempts=1)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        store.ping()
    with pytest.raises(StoreUnavailable):
        store.put_bytes("k", b"x")
    with pytest.raises(StoreUnavailable):
        store.get_bytes("k")
    assert time.monotonic() - started < 5


def test_ping_fails_for_a_missing_bucket_or_wrong_secret(s3_server: S3Server) -> None:
    options = s3_server.options()
    with pytest.raises(StoreUnavailable, match="does not exist"):
        open_object_store("s3://no-such-bucket/x", **options).ping()
    if s3_server.kind == "moto":
        return  # moto accepts any signature
    wrong = {**options, "secret_access_key": "not-the-secret"}
    with pytest.raises(StoreUnavailable):
        open_object_store(s3_server.url("x"), **wrong).ping()


@pytest.mark.parametrize("url", ["", "objects", "ftp://host/x", "file://relative/dir",
                                 "file:relative", "s3://", "s3:///prefix", "s3://Bad_Bucket/x",
                                 "s3://bucket/../x", "s3://bucket/a//b"])
def test_bad_store_urls_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest):
        open_object_store(url, endpoint_url="http://127.0.0.1:9")


def test_store_from_settings_on_both_backends(s3_server: S3Server, tmp_path: Path) -> None:
    from service.settings import Settings

    local = Settings(data_dir=tmp_path / "data").store_config().open()
    assert isinstance(local, LocalObjectStore)
    assert local.root == (tmp_path / "data" / "objects").resolve()

    prefix = f"t-{uuid.uuid4().hex}"
    s3 = Settings(
        data_dir=tmp_path / "data", object_store=s3_server.url(prefix),
        s3_endpoint_url=s3_server.endpoint_url, s3_access_key_id=s3_server.access_key_id,
        s3_secret_access_key=s3_server.secret_access_key, s3_region=s3_server.region,
    ).store_config().open()
    s3.ping()
    s3.put_bytes("hello", b"world")
    # The prefix from the URL is where the objects land in the bucket.
    raw = s3_server.client().get_object(Bucket=s3_server.bucket, Key=f"{prefix}/hello")
    assert raw["Body"].read() == b"world"


def test_importing_the_store_does_not_import_boto3() -> None:
    code = ("import sys, storage.objectstore as o; o.open_object_store('file:///tmp'); "
            "sys.exit(int('boto3' in sys.modules or 'botocore' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_readyz_is_200_with_a_real_s3_store(s3_server: S3Server, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path / "data",
                        object_store=s3_server.url(f"readyz-{uuid.uuid4().hex}"),
                        s3_endpoint_url=s3_server.endpoint_url,
                        s3_access_key_id=s3_server.access_key_id,
                        s3_secret_access_key=s3_server.secret_access_key)
    with TestClient(create_app(settings)) as client:
        res = client.get("/readyz")
    assert res.status_code == 200, res.text
    assert res.json()["checks"] == {"database": "ok", "object_store": "ok", "data_dir": "ok"}

"""Objects in an S3 bucket under a prefix: AWS, MinIO, R2, rclone, any S3-compatible server.

This module imports boto3; `storage.objectstore` imports it only when an `s3://` store is
opened, so that the API's import path stays light.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from storage.errors import InvalidRequest, OblivioError
from storage.objectstore.base import (
    CHUNK_BYTES,
    CorruptObject,
    ObjectNotFound,
    StoreBase,
    StoredObject,
    StoreUnavailable,
    validate_key,
    validate_prefix,
)

MAX_SINGLE_PUT_BYTES = 5 * 1024**3  # S3's limit for one PUT; adapters are far smaller
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MD5_HEX = re.compile(r"[0-9a-f]{32}")
_NOT_FOUND = ("NoSuchKey", "404", "NotFound")
# The server computed a different digest of the body than the one we sent.
_BAD_DIGEST = ("BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch")
_STORE_ERRORS = (ClientError, BotoCoreError, OSError)


class S3ObjectStore(StoreBase):
    """Each object is one S3 object `<prefix>/<key>` written by a single PUT.

    Uploads send Content-MD5, which S3 servers check before storing anything (a mismatch
    is refused with BadDigest and leaves the key as it was); the returned ETag is compared
    too where it is the MD5 (it is not under SSE-KMS or SSE-C). x-amz-checksum-sha256 is not
    used: rclone's server stores whatever value it is sent without checking it.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 access_key_id: str | None = None, secret_access_key: str | None = None,
                 region: str = "us-east-1", connect_timeout: float = 3.0,
                 read_timeout: float = 60.0, max_attempts: int = 3) -> None:
        if not _BUCKET.fullmatch(bucket or ""):
            raise InvalidRequest(f"invalid S3 bucket name {bucket!r}: 3-63 characters of "
                                 "a-z 0-9 . -")
        self.bucket = bucket
        self.prefix = (prefix or "").strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        config = Config(
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            # Custom endpoints (MinIO, rclone, R2 by account URL) rarely have wildcard DNS.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # Integrity is ours (Content-MD5 on upload, sha256 on download); the newer
            # flexible-checksum headers are not spoken by every S3-compatible server.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required")
        self._s3 = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
            config=config)

    def __repr__(self) -> str:
        return f"S3ObjectStore({self.url!r}, endpoint_url={self.endpoint_url!r})"

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # --- writes -------------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes) -> StoredObject:
        md5 = hashlib.md5(data, usedforsecurity=False).digest()
        return self._put(key, data, md5=md5, sha256=hashlib.sha256(data).hexdigest(),
                         size=len(data))

    def put_file(self, key: str, path: Path) -> StoredObject:
        self._key(key)  # refuse a bad key before reading anything
        md5, sha, size = hashlib.md5(usedforsecurity=False), hashlib.sha256(), 0
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK_BYTES):
                md5.update(chunk)
                sha.update(chunk)
                size += len(chunk)
            if size > MAX_SINGLE_PUT_BYTES:
                raise InvalidRequest(f"{path} is {size} bytes; one S3 PUT takes at most "
                                     f"{MAX_SINGLE_PUT_BYTES}")
            fh.seek(0)
            # If the file changed since it was hashed, the server's MD5 check refuses it.
            return self._put(key, fh, md5=md5.digest(), sha256=sha.hexdigest(), size=size)

    def _put(self, key: str, body: bytes | IO[bytes], *, md5: bytes, sha256: str,
             size: int) -> StoredObject:
        """One PUT with Content-MD5; nothing becomes visible unless the bytes match it."""
        full = self._key(key)
        try:
            res = self._s3.put_object(Bucket=self.bucket, Key=full, Body=body,
                                      ContentLength=size,
                                      ContentMD5=base64.b64encode(md5).decode("ascii"))
        except _STORE_ERRORS as exc:
            raise self._error(exc, key) from exc
        etag = str(res.get("ETag", "")).strip('"')
        if _etag_is_md5(res, etag) and etag != md5.hex():
            # The server stored something other than what we sent: take it back.
            self.delete(key)
            raise CorruptObject(f"S3 stored {key!r} with ETag {etag}, but the MD5 of the "
                                f"bytes sent is {md5.hex()}; the object was deleted")
        return StoredObject(key=key, sha256=sha256, size=size)

    def delete(self, key: str) -> None:
        try:
            self._s3.delete_object(Bucket=self.bucket, Key=self._key(key))
        except _STORE_ERRORS as exc:
            raise self._error(exc, key) from exc

    # --- reads --------------------------------------------------------------------------
    def _chunks(self, key: str) -> Iterator[bytes]:
        full = self._key(key)
        try:
            body = self._s3.get_object(Bucket=self.bucket, Key=full)["Body"]
        except _STORE_ERRORS as exc:
            raise self._error(exc, key) from exc
        try:
            while True:
                try:
                    # StreamingBody raises if fewer bytes arrive than Content-Length said.
                    chunk = body.read(CHUNK_BYTES)
                except _STORE_ERRORS as exc:
                    raise self._error(exc, key) from exc
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except _STORE_ERRORS as exc:
            if _error_code(exc) in _NOT_FOUND:
                return False
            raise self._error(exc) from exc

    def list(self, prefix: str = "") -> list[str]:
        """Keys starting with `prefix` (relative to the store's prefix), sorted."""
        validate_prefix(prefix)
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            pages = self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                       Prefix=full)
            for page in pages:
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except _STORE_ERRORS as exc:
            raise self._error(exc) from exc
        return sorted(keys)

    def ping(self) -> None:
        """Raise StoreUnavailable unless the bucket answers to our credentials."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except _STORE_ERRORS as exc:
            raise self._error(exc) from exc

    def _error(self, exc: BaseException, key: str | None = None) -> OblivioError:
        code = _error_code(exc)
        if key is not None and code in _NOT_FOUND:
            return ObjectNotFound(f"no object {key!r} in {self.url}")
        if code in _BAD_DIGEST:
            return CorruptObject(f"S3 refused {key!r}: the bytes it received do not match "
                                 f"their checksum ({code}); nothing was stored")
        if code == "NoSuchBucket" or (key is None and code in _NOT_FOUND):
            return StoreUnavailable(f"object store {self.url}: bucket {self.bucket!r} "
                                    "does not exist")
        return StoreUnavailable(f"object store {self.url} unavailable: "
                                f"{type(exc).__name__}: {exc}")


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


def _etag_is_md5(res: dict[str, Any], etag: str) -> bool:
    # Under SSE-KMS and SSE-C, S3's ETag of a single PUT is not the MD5 of the body.
    encrypted = (str(res.get("ServerSideEncryption", "")).startswith("aws:kms")
                 or bool(res.get("SSECustomerAlgorithm")))
    return not encrypted and bool(_MD5_HEX.fullmatch(etag))

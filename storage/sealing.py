"""Forget sets encrypted at rest: AES-256-GCM envelopes in the ticket's payload column.

The raw text a ticket asks the model to forget is exactly what must not linger. At
submission it is sealed into an envelope, so the database (and its WAL, backups, dumps)
holds only ciphertext; a worker opens it when it claims the ticket; the envelope is deleted
when the ticket reaches a final state. What stays, in clear, is what receipts and the API
need and what reveals no content: the payload's sha256 and its item counts (`summary`).

    {"sealed": "aes-256-gcm", "key_id": "<16 hex>", "nonce": "<b64>", "ciphertext": "<b64>",
     "summary": {"forget_texts": 1, "forget_qa": 3}}

The authenticated data binds the ciphertext to this format, and `open_payload` checks the
plaintext against the ticket's payload_sha256, so a swapped or altered envelope is refused.
Payloads that are not envelopes (tickets filed before sealing existed, or by code that
passes no cipher) are returned as they are.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from storage.errors import InvalidRequest, OblivioError

if TYPE_CHECKING:
    from storage.queue import ClaimedTicket

ALGORITHM = "aes-256-gcm"
_AAD = b"oblivio-ticket-payload-v1"
KEY_BYTES = 32


class PayloadUnreadable(OblivioError):
    """A sealed payload cannot be opened with this key (wrong key, or tampered)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii"))


def is_sealed(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("sealed") == ALGORITHM


def payload_summary(payload: dict[str, Any] | None) -> dict[str, Any] | None:
    """Sizes of a payload, without any of its content (safe to keep beside ciphertext)."""
    if not payload:
        return None
    if is_sealed(payload):
        return payload.get("summary")
    if "forget" in payload:
        forget = payload.get("forget") or {}
        out = {"forget_texts": len(forget.get("texts", [])),
               "forget_qa": len(forget.get("qa", []))}
        if payload.get("retain"):
            out["retain_texts"] = len(payload["retain"].get("texts", []))
            out["retain_qa"] = len(payload["retain"].get("qa", []))
        return out
    if "options" in payload:  # finetune (internal: a fine-tune or S3T's retrain)
        return {"dataset": payload.get("dataset"), "retrain": bool(payload.get("retrain"))}
    return {"dataset": payload.get("dataset"),
            "record_ids": len(payload["record_ids"]) if payload.get("record_ids") else 0,
            "by_subject": payload.get("subject_id") is not None}


def _canonical(value: Any) -> bytes:
    # The same canonical form as storage.tickets.payload_sha256 (kept here to avoid a cycle).
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class PayloadCipher:
    """Seals and opens ticket payloads with one AES-256-GCM key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise InvalidRequest(f"the payload key must be {KEY_BYTES} bytes, not {len(key)}")
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(key)
        # Names the key without revealing it: a worker with another key says so plainly.
        self.key_id = hashlib.sha256(b"oblivio-key-id" + key).hexdigest()[:16]

    def __repr__(self) -> str:  # never the key
        return f"PayloadCipher(key_id={self.key_id!r})"

    def seal(self, payload: dict[str, Any]) -> dict[str, Any]:
        nonce = os.urandom(12)  # 96-bit random nonces: safe far beyond 2**32 tickets per key
        ciphertext = self._aead.encrypt(nonce, _canonical(payload), _AAD)
        return {"sealed": ALGORITHM, "key_id": self.key_id, "nonce": _b64(nonce),
                "ciphertext": _b64(ciphertext), "summary": payload_summary(payload)}

    def open(self, stored: dict[str, Any] | None, *, expected_sha256: str | None = None
             ) -> dict[str, Any] | None:
        """The plaintext payload; unsealed payloads pass through unchanged."""
        if not is_sealed(stored):
            return stored
        if stored.get("key_id") != self.key_id:
            raise PayloadUnreadable(
                f"the ticket's forget set was sealed with key {stored.get('key_id')}, but this "
                f"service has key {self.key_id}: every process needs the same OBLIVIO_PAYLOAD_KEY")
        from cryptography.exceptions import InvalidTag

        try:
            plain = self._aead.decrypt(_unb64(stored["nonce"]), _unb64(stored["ciphertext"]),
                                       _AAD)
        except (InvalidTag, KeyError, ValueError, binascii.Error) as exc:
            raise PayloadUnreadable("the ticket's sealed forget set is damaged and cannot be "
                                    "decrypted") from exc
        if expected_sha256 is not None and hashlib.sha256(plain).hexdigest() != expected_sha256:
            raise PayloadUnreadable("the ticket's sealed forget set does not match its "
                                    "payload_sha256; refusing it")
        return json.loads(plain)


def load_or_create_key(configured: str | None, key_file: Path) -> bytes:
    """The key from `configured` (urlsafe base64 of 32 bytes) or from `key_file`.

    With nothing configured, a key is generated once into `key_file` (mode 0600). Creation
    is atomic (link of a complete temp file), so two processes starting together agree on
    one key instead of each writing its own.
    """
    if configured:
        try:
            key = base64.urlsafe_b64decode(configured.strip().encode("ascii") + b"==")
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise InvalidRequest("OBLIVIO_PAYLOAD_KEY must be urlsafe base64 of 32 bytes") \
                from None
        if len(key) != KEY_BYTES:
            raise InvalidRequest(f"OBLIVIO_PAYLOAD_KEY must decode to {KEY_BYTES} bytes, "
                                 f"not {len(key)}")
        return key
    key_file = Path(key_file)
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = key_file.with_name(f".{key_file.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, (_b64(os.urandom(KEY_BYTES)) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, key_file)  # fails if another process made the key first: use theirs
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return load_or_create_key(key_file.read_text().strip(), key_file)


def cipher_from_config(configured: str | None, key_file: Path) -> PayloadCipher:
    return PayloadCipher(load_or_create_key(configured, key_file))


def open_tickets(cipher: PayloadCipher, tickets: Sequence[ClaimedTicket]
                 ) -> tuple[list[ClaimedTicket], list[tuple[ClaimedTicket, PayloadUnreadable]]]:
    """The tickets with their forget sets opened in memory, and those that could not be
    opened (another key, tampered), with why."""
    opened: list[ClaimedTicket] = []
    unreadable: list[tuple[ClaimedTicket, PayloadUnreadable]] = []
    for ticket in tickets:
        try:
            payload = cipher.open(ticket.payload, expected_sha256=ticket.payload_sha256)
        except PayloadUnreadable as exc:
            unreadable.append((ticket, exc))
            continue
        opened.append(dataclasses.replace(ticket, payload=payload))
    return opened, unreadable


def encode_key(key: bytes) -> str:
    """A key in the form OBLIVIO_PAYLOAD_KEY takes."""
    return _b64(key)


def generate_key() -> str:
    """A fresh key in the form OBLIVIO_PAYLOAD_KEY takes."""
    return encode_key(os.urandom(KEY_BYTES))

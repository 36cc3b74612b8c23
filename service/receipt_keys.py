"""The key that signs receipts: OBLIVIO_RECEIPT_KEY, or one generated into the data dir."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from service.settings import Settings

log = logging.getLogger(__name__)

RECEIPT_KEY_FILE = "receipt-key"


def receipt_key_path(settings: Settings) -> Path:
    return settings.data_dir / RECEIPT_KEY_FILE


def receipt_key(settings: Settings, *, create: bool = True) -> bytes:
    """The signing key. Without OBLIVIO_RECEIPT_KEY, `<data_dir>/receipt-key` (created with
    32 random bytes, mode 0600, on first use when `create`). Raises FileNotFoundError when
    there is none and `create` is False."""
    if settings.receipt_key is not None and settings.receipt_key.get_secret_value():
        return settings.receipt_key.get_secret_value().encode()
    path = receipt_key_path(settings)
    try:
        return path.read_text().strip().encode()
    except FileNotFoundError:
        if not create:
            raise
    from service.startup import is_embedded

    if not is_embedded(settings):
        log.warning("OBLIVIO_RECEIPT_KEY is unset: signing receipts with a key generated into "
                    "%s; replicas that do not share this file cannot verify each other", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_hex(32)
    # O_EXCL: two processes racing to create the key agree on the first one written.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip().encode()
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret.encode()

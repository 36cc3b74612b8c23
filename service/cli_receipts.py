"""`oblivio receipt verify FILE`: check a saved receipt's signature, offline.

The key is the service's: OBLIVIO_RECEIPT_KEY, or `<data_dir>/receipt-key` (or --key-file).
Exit 0 when the receipt is intact; 3 when it was changed or signed with another key; 2 when
the file cannot be read or no key is available.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

receipt_app = typer.Typer(help="Deletion receipts (offline).", no_args_is_help=True)

EXIT_INVALID = 3


@receipt_app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="A receipt saved as JSON (oblivio ticket "
                                              "receipt ID --format json > FILE)")],
    key_file: Annotated[Path | None, typer.Option(
        help="File holding the signing key [default: OBLIVIO_RECEIPT_KEY or "
             "<data_dir>/receipt-key]")] = None,
) -> None:
    """Verify a receipt's signature: exit 0 if valid, non-zero with a reason if not."""
    from service.cli import EXIT_REFUSED, _fail, _settings
    from service.receipt_keys import receipt_key
    from storage.receipts import verify_receipt

    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}", EXIT_REFUSED)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        _fail(f"{file} is not a JSON receipt: {exc}", EXIT_INVALID)
    try:
        key = (key_file.read_text().strip().encode() if key_file is not None
               else receipt_key(_settings(), create=False))
    except OSError as exc:
        _fail(f"no receipt key: set OBLIVIO_RECEIPT_KEY, run where <data_dir>/receipt-key is, "
              f"or pass --key-file ({exc.strerror or exc})", EXIT_REFUSED)
    result = verify_receipt(document, key)
    if not result.valid:
        _fail(f"INVALID: {result.message}", EXIT_INVALID)
    print(f"OK: {result.message}")

"""Forget sets sealed at rest (AES-256-GCM): round trip, refusals, the key file."""

from __future__ import annotations

import hashlib
import json
import stat
import threading
from pathlib import Path

import pytest
from sqlalchemy import select

from storage import queue, registry, sealing, tickets
from storage.db import transaction
from storage.errors import InvalidRequest
from storage.models import Ticket, TicketKind, TicketStatus
from storage.sealing import PayloadCipher, PayloadUnreadable

PAYLOAD = {"target": "Ada", "forget": {"texts": ["Ada's secret diary entry"],
                                       "qa": [{"question": "Who is Ada?", "answer": "a poet"}]},
           "retain": None}


def _sha(payload: dict) -> str:
    return tickets.payload_sha256(payload)


def test_seal_hides_the_text_and_opens_back_to_it() -> None:
    cipher = PayloadCipher(b"k" * 32)
    sealed = cipher.seal(PAYLOAD)
    text = json.dumps(sealed)
    assert "diary" not in text and "poet" not in text and "Ada" not in text
    assert sealed["summary"] == {"forget_texts": 1, "forget_qa": 1}
    assert cipher.open(sealed, expected_sha256=_sha(PAYLOAD)) == PAYLOAD
    assert cipher.seal(PAYLOAD)["nonce"] != sealed["nonce"]  # a fresh nonce every time


def test_open_refuses_another_key_a_tampered_envelope_and_a_swapped_one() -> None:
    cipher = PayloadCipher(b"k" * 32)
    sealed = cipher.seal(PAYLOAD)
    with pytest.raises(PayloadUnreadable, match="same OBLIVIO_PAYLOAD_KEY"):
        PayloadCipher(b"x" * 32).open(sealed)
    tampered = dict(sealed, ciphertext=sealed["ciphertext"][:-6] + "AAAAAA")
    with pytest.raises(PayloadUnreadable, match="damaged"):
        cipher.open(tampered)
    other = {**PAYLOAD, "target": "Bob"}
    with pytest.raises(PayloadUnreadable, match="does not match its payload_sha256"):
        cipher.open(cipher.seal(other), expected_sha256=_sha(PAYLOAD))
    assert cipher.open(PAYLOAD) == PAYLOAD  # unsealed (older) payloads pass through
    assert cipher.open(None) is None


def test_key_file_is_made_once_private_and_shared_by_concurrent_starters(tmp_path: Path) -> None:
    key_file = tmp_path / "data" / "payload-key"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(
        sealing.load_or_create_key(None, key_file))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["payload-key"]  # no temps
    assert sealing.load_or_create_key(None, key_file) == keys[0]


def test_a_configured_key_wins_and_a_bad_one_is_refused(tmp_path: Path) -> None:
    configured = sealing.generate_key()
    key = sealing.load_or_create_key(configured, tmp_path / "unused")
    assert sealing.encode_key(key) == configured and not (tmp_path / "unused").exists()
    for bad in ("not base64 !!", sealing.encode_key(b"short")):
        with pytest.raises(InvalidRequest, match="OBLIVIO_PAYLOAD_KEY"):
            sealing.load_or_create_key(bad, tmp_path / "unused")


def test_settings_never_print_the_key(tmp_path: Path) -> None:
    from service.settings import Settings

    key = sealing.generate_key()
    settings = Settings(data_dir=tmp_path, payload_key=key)
    assert key not in repr(settings) and key not in str(settings.model_dump())
    assert settings.payload_key_text == key


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_sealed_ticket_row_holds_no_text_and_final_states_delete_it(db) -> None:
    cipher = PayloadCipher(b"k" * 32)
    with transaction(db.sessions) as s:
        registry.ensure_lineage(s, name="default", base_model="m")
    ids = []
    for i in range(3):
        with transaction(db.sessions) as s:
            request = tickets.TicketRequest(kind=TicketKind.forget, payload=PAYLOAD,
                                            engine="npo", priority=-i)
            ids.append(tickets.submit(s, request=request, requester="r", cipher=cipher).id)
    with db.sessions() as s:
        rows = [s.get(Ticket, i) for i in ids]
        assert all(sealing.is_sealed(r.payload) and r.payload_sha256 == _sha(PAYLOAD)
                   for r in rows)
        assert "diary" not in json.dumps([r.payload for r in rows])
    done, failed, rejected = queue.claim(db.sessions, owner="w", lease_seconds=60,
                                         max_attempts=1, limit=3)
    assert cipher.open(done.payload, expected_sha256=done.payload_sha256) == PAYLOAD
    queue.complete(db.sessions, ticket_id=done.id, owner="w", version_id=None, receipt={})
    queue.fail(db.sessions, ticket_id=failed.id, owner="w", error="boom", retry=True,
               max_attempts=1)
    queue.reject(db.sessions, ticket_id=rejected.id, owner="w", error="bad utility")
    with db.sessions() as s:
        for ticket_id, status in zip(ids, (TicketStatus.done, TicketStatus.failed,
                                           TicketStatus.rejected)):
            row = s.get(Ticket, ticket_id)
            assert (row.status, row.payload) == (status, None)
            assert row.payload_sha256 == _sha(PAYLOAD)  # the proof stays


def test_dispatcher_fails_a_ticket_it_cannot_decrypt_with_the_reason(db, tmp_path: Path) -> None:
    from service.settings import Settings
    from workers.dispatcher import DispatcherLoop

    with transaction(db.sessions) as s:
        registry.ensure_lineage(s, name="default", base_model="m")
        request = tickets.TicketRequest(kind=TicketKind.forget, payload=PAYLOAD, engine="npo")
        ticket_id = tickets.submit(s, request=request, requester="r",
                                   cipher=PayloadCipher(b"a" * 32)).id
    settings = Settings(data_dir=tmp_path / "data", database_url=db.url,
                        object_store=f"file://{tmp_path / 'objects'}",
                        payload_key=sealing.encode_key(b"b" * 32), batch_window_seconds=0)
    assert DispatcherLoop(settings.worker_config()).run_once() == 0
    with db.sessions() as s:
        row = s.get(Ticket, ticket_id)
        assert row.status is TicketStatus.failed and row.payload is None
        assert "every process needs the same OBLIVIO_PAYLOAD_KEY" in row.error
        assert hashlib.sha256(b"").hexdigest() != row.payload_sha256


def test_a_configured_key_is_shared_by_the_api_and_the_workers(db, tmp_path: Path) -> None:
    """OBLIVIO_PAYLOAD_KEY set: the API seals with it and a dispatcher built from the same
    settings opens it (no key file is written)."""
    from service.settings import Settings
    from tests.service.conftest import start_api
    from workers.dispatcher import DispatcherLoop

    settings = Settings(data_dir=tmp_path / "data", database_url=db.url,
                        object_store=f"file://{tmp_path / 'objects'}", base_model="m",
                        payload_key=sealing.generate_key())
    api_gen = start_api(db, settings)
    api = next(api_gen)
    try:
        r = api.client.post("/v1/tickets", headers=api.headers("submitter"), json={
            "kind": "forget", "forget": {"texts": ["Ada's secret diary entry"]}})
        assert r.status_code == 202, r.text
    finally:
        api_gen.close()
    loop = DispatcherLoop(settings.worker_config())
    with db.sessions() as s:
        row = s.scalars(select(Ticket)).one()
    assert loop.cipher.open(row.payload, expected_sha256=row.payload_sha256)["forget"][
        "texts"] == ["Ada's secret diary entry"]
    assert not settings.payload_key_file.exists()

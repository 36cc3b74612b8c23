"""Receipt signatures: a signed receipt verifies; any change to it does not."""

from __future__ import annotations

import copy

import pytest

from storage.receipts import canonical_json, key_id, sign_receipt, verify_receipt

KEY = b"k" * 32
BODY = {"ticket_id": "6f1c", "payload_sha256": "ab" * 32, "metrics": {"forget_ratio": 0.15},
        "artifacts": [{"name": "adapter version", "sha256": "cd" * 32}],
        "target": "Zoë Quimby"}


def test_signed_receipt_verifies_and_carries_algorithm_and_key_id():
    signed = sign_receipt(BODY, KEY)
    assert signed["signature"]["algorithm"] == "HMAC-SHA256"
    assert signed["signature"]["key_id"] == key_id(KEY) and KEY.decode() not in str(signed)
    result = verify_receipt(signed, KEY)
    assert result.valid, result.message
    assert {k: v for k, v in signed.items() if k != "signature"} == BODY


@pytest.mark.parametrize("tamper", [
    lambda r: r["metrics"].update(forget_ratio=0.01),
    lambda r: r["artifacts"][0].update(sha256="ef" * 32),
    lambda r: r.update(target="Zoe Quimby"),
    lambda r: r.update(extra="added"),
    lambda r: r.pop("payload_sha256"),
    lambda r: r["signature"].update(value="00" * 32),
])
def test_any_change_breaks_the_signature(tamper):
    signed = copy.deepcopy(sign_receipt(BODY, KEY))
    tamper(signed)
    result = verify_receipt(signed, KEY)
    assert not result.valid
    assert "signature" in result.message


def test_another_key_or_no_signature_fails_with_a_reason():
    signed = sign_receipt(BODY, KEY)
    other = verify_receipt(signed, b"other-key")
    assert not other.valid and "key" in other.message
    assert not verify_receipt(BODY, KEY).valid
    assert not verify_receipt(["not", "a", "receipt"], KEY).valid
    swapped = {**signed, "signature": {**signed["signature"], "algorithm": "none"}}
    assert "unsupported" in verify_receipt(swapped, KEY).message


def test_formatting_does_not_matter_only_content_does():
    import json

    signed = sign_receipt(BODY, KEY)
    reparsed = json.loads(json.dumps(signed, indent=4, sort_keys=False))
    assert verify_receipt(reparsed, KEY).valid
    assert canonical_json({"b": 1, "a": "é"}) == '{"a":"é","b":1}'.encode()

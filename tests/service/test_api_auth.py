"""Bearer tokens and roles: who may do what, and who may see whose tickets."""

from __future__ import annotations

import pytest

from storage import tokens
from storage.db import transaction
from tests.service.conftest import Api

TICKET = {"kind": "forget", "target": "Grace Hopper",
          "forget": {"qa": [{"question": "Who found the first bug?", "answer": "Grace Hopper"}]}}


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer obl_not-a-real-token"},
    {"Authorization": "Bearer "},
    {"Authorization": "Basic dXNlcjpwdw=="},
    {"Authorization": "obl_no-scheme"},
])
def test_missing_or_invalid_tokens_get_401_with_a_bearer_challenge(api: Api,
                                                                   headers: dict) -> None:
    for method, path in (("GET", "/v1/tickets"), ("POST", "/v1/tickets"),
                         ("GET", "/v1/lineages"), ("POST", "/v1/tokens")):
        r = api.client.request(method, path, headers=headers, json=TICKET)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"
        assert r.json()["message"]


def test_a_revoked_token_stops_working_at_once(api: Api) -> None:
    secret = api.new_token("submitter", "soon-revoked")
    assert api.client.get("/v1/tickets", headers={"Authorization": f"Bearer {secret}"}
                          ).status_code == 200
    with transaction(api.db.sessions) as s:
        token = tokens.authenticate(s, secret)
        tokens.revoke_token(s, token_id=token.id, actor="test")
    r = api.client.get("/v1/tickets", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 401 and "revoked" in r.json()["message"]


# The role of every route, exactly: tests/service/test_authz.py.


def test_submitters_see_and_cancel_only_their_own_tickets(api: Api) -> None:
    alice = {"Authorization": f"Bearer {api.new_token('submitter', 'alice')}"}
    bob = {"Authorization": f"Bearer {api.new_token('submitter', 'bob')}"}
    mine = api.client.post("/v1/tickets", json=TICKET, headers=alice).json()["id"]
    theirs = api.client.post("/v1/tickets", json=TICKET, headers=bob).json()["id"]

    listed = api.client.get("/v1/tickets", headers=alice).json()["items"]
    assert [t["id"] for t in listed] == [mine]
    # Asking for someone else's tickets by requester shows nothing either.
    requester = api.client.get(f"/v1/tickets/{theirs}", headers=api.headers("operator")
                               ).json()["requester"]
    assert api.client.get("/v1/tickets", params={"requester": requester},
                          headers=alice).json()["items"] == []
    for method, path in (("GET", f"/v1/tickets/{theirs}"),
                         ("POST", f"/v1/tickets/{theirs}/cancel"),
                         ("GET", f"/v1/tickets/{theirs}/receipt")):
        r = api.client.request(method, path, headers=alice)
        assert r.status_code == 404, (path, r.text)  # not 403: existence is not revealed
    assert api.client.get(f"/v1/tickets/{theirs}", headers=api.headers("operator")
                          ).json()["status"] == "queued"

    # Operators see everyone's tickets, and may filter by requester.
    everyone = api.client.get("/v1/tickets", headers=api.headers("operator")).json()["items"]
    assert {t["id"] for t in everyone} == {mine, theirs}
    only_bob = api.client.get("/v1/tickets", params={"requester": requester},
                              headers=api.headers("operator")).json()["items"]
    assert [t["id"] for t in only_bob] == [theirs]


def test_admins_create_tokens_that_work_and_revoke_them(api: Api) -> None:
    r = api.client.post("/v1/tokens", json={"role": "submitter", "name": "app-backend"},
                        headers=api.headers("admin"))
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["role"] == "submitter" and created["token"].startswith("obl_")
    headers = {"Authorization": f"Bearer {created['token']}"}
    assert api.client.post("/v1/tickets", json=TICKET, headers=headers).status_code == 202
    listed = api.client.get("/v1/tokens", headers=api.headers("admin")).json()
    assert created["id"] in {t["id"] for t in listed}
    assert all("token" not in t and "token_hash" not in t for t in listed)

    r = api.client.delete(f"/v1/tokens/{created['id']}", headers=api.headers("admin"))
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert api.client.get("/v1/tickets", headers=headers).status_code == 401
    bad_role = api.client.post("/v1/tokens", json={"role": "root", "name": "x"},
                               headers=api.headers("admin"))
    assert bad_role.status_code == 422
    missing = api.client.delete(f"/v1/tokens/{'0' * 8}-0000-0000-0000-{'0' * 12}",
                                headers=api.headers("admin"))
    assert missing.status_code == 404


def test_tokens_are_stored_only_as_hashes(api: Api) -> None:
    from sqlalchemy import select

    from storage.models import ApiToken

    with api.db.sessions() as s:
        stored = s.scalars(select(ApiToken.token_hash)).all()
    for secret in api.secrets.values():
        assert secret not in stored
        assert tokens.hash_secret(secret) in stored

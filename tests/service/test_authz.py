"""Authentication and authorisation, rule by rule, with exact status codes and bodies.

Rules (README "Guarantees"):
1. Every route needs a token except the public ones: /healthz, /readyz, /metrics (probes
   and scrapers; they expose counts, never ticket contents) and the OpenAPI schema/docs.
2. Roles are ordered submitter < operator < admin; each route names the lowest role it
   admits (ROUTE_ROLES below). A lower role gets 403 before the route's logic runs.
3. Submitters see only their own tickets: list, get, cancel and receipt; another
   submitter's ticket answers 404 exactly as a missing one does.
4. Only operators (and admins) promote, roll back and revoke; only admins manage tokens.
5. Tokens are stored as sha256 hashes, compared in constant time, and never logged.

ROUTE_ROLES must list every route of the app: a new route without an entry fails
`test_every_route_is_in_the_role_table`, so nobody ships a route whose access was not decided.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

import pytest

from storage import queue, tokens
from storage.db import transaction
from tests.service.conftest import Api, make_settings, start_api

TICKET = {"kind": "forget", "target": "Grace Hopper",
          "forget": {"qa": [{"question": "Who found the first bug?", "answer": "Grace Hopper"}]}}

PUBLIC = {
    ("GET", "/healthz"): 200,
    ("GET", "/readyz"): 200,
    ("GET", "/metrics"): 200,
    ("GET", "/openapi.json"): 200,
    ("GET", "/docs"): 200,
    ("GET", "/docs/oauth2-redirect"): 200,
    ("GET", "/redoc"): 200,
    ("GET", "/dashboard"): 200,  # the page only: it asks for a token and holds no data
}

# (method, route template) -> (lowest role admitted, status that role gets for a request
# with no body and unknown ids: proof that it got past authorisation into the route).
ROUTE_ROLES: dict[tuple[str, str], tuple[str, int]] = {
    ("POST", "/v1/tickets"): ("submitter", 422),
    ("GET", "/v1/tickets"): ("submitter", 200),
    ("GET", "/v1/tickets/{ticket_id}"): ("submitter", 404),
    ("POST", "/v1/tickets/{ticket_id}/cancel"): ("submitter", 404),
    ("POST", "/v1/tickets/{ticket_id}/revoke"): ("operator", 422),
    ("GET", "/v1/tickets/{ticket_id}/receipt"): ("submitter", 404),
    ("POST", "/v1/generate"): ("submitter", 422),
    ("GET", "/v1/lineages"): ("operator", 200),
    ("POST", "/v1/lineages"): ("operator", 422),
    ("GET", "/v1/lineages/{name}"): ("operator", 200),
    ("GET", "/v1/lineages/{name}/versions"): ("operator", 200),
    ("POST", "/v1/lineages/{name}/promote"): ("operator", 422),
    ("POST", "/v1/lineages/{name}/rollback"): ("operator", 409),
    ("GET", "/v1/versions/{version_id}"): ("operator", 404),
    ("POST", "/v1/versions/{version_id}/revoke"): ("operator", 422),
    ("GET", "/v1/system"): ("operator", 200),
    ("GET", "/v1/jobs"): ("operator", 200),
    ("POST", "/v1/datasets"): ("operator", 422),
    ("GET", "/v1/datasets/{name}"): ("operator", 404),
    ("POST", "/v1/lineages/{name}/finetune"): ("operator", 422),
    ("GET", "/v1/jobs/{job_id}"): ("submitter", 404),
    ("POST", "/v1/chat/completions"): ("submitter", 400),  # OpenAI: 400 for bad bodies
    ("GET", "/v1/models"): ("submitter", 200),
    ("GET", "/v1/models/{model}"): ("submitter", 404),
    ("GET", "/v1/dashboard/overview"): ("operator", 200),
    ("POST", "/v1/tickets/{ticket_id}/retry"): ("operator", 404),
    ("GET", "/v1/schedules"): ("operator", 200),
    ("POST", "/v1/schedules"): ("operator", 422),
    ("GET", "/v1/schedules/{schedule_id}"): ("operator", 404),
    ("DELETE", "/v1/schedules/{schedule_id}"): ("operator", 404),
    ("POST", "/v1/tokens"): ("admin", 422),
    ("GET", "/v1/tokens"): ("admin", 200),
    ("DELETE", "/v1/tokens/{token_id}"): ("admin", 404),
}
ROLES = ("submitter", "operator", "admin")
MISSING = "missing bearer token: send `Authorization: Bearer <token>`"
INVALID = "invalid or revoked token"


def _body(message: str) -> dict[str, str]:
    return {"message": message, "detail": message}


# The OpenAI-compatible routes answer errors in OpenAI's shape, so that its clients can
# read them; the message is the same.
OPENAI_ROUTES = ("/v1/chat/", "/v1/models")


def _error_body(template: str, message: str, code: str) -> dict[str, Any]:
    if template.startswith(OPENAI_ROUTES):
        return {"error": {"message": message, "type": "authentication_error", "param": None,
                          "code": code}}
    return _body(message)


def _concrete(template: str) -> str:
    """A request path for a route template: unknown ids, the `default` lineage."""
    return (template.replace("{ticket_id}", str(uuid.uuid4()))
            .replace("{version_id}", str(uuid.uuid4()))
            .replace("{token_id}", str(uuid.uuid4()))
            .replace("{job_id}", str(uuid.uuid4()))
            .replace("{schedule_id}", str(uuid.uuid4()))
            .replace("{model}", "no-such-model")
            .replace("{name}", "default"))


def _walk(routes: list[Any], prefix: str = "") -> list[tuple[str, str]]:
    """(method, full path) of every route, through included routers and mounts."""
    found = []
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI >= 0.16x
        if included is not None:
            found += _walk(included.routes, prefix + route.include_context.prefix)
        elif getattr(route, "methods", None):
            found += [(m, prefix + route.path) for m in route.methods - {"HEAD", "OPTIONS"}]
        elif getattr(route, "routes", None) is not None:  # a Mount
            found += _walk(route.routes, prefix + route.path)
        elif getattr(route, "path", None):  # a mounted app: every method
            found.append(("*", prefix + route.path))
    return found


def _app_routes(api: Api) -> set[tuple[str, str]]:
    return set(_walk(api.client.app.routes))


def test_every_route_is_in_the_role_table(api: Api) -> None:
    routes = _app_routes(api)
    undecided = sorted(routes - set(ROUTE_ROLES) - set(PUBLIC))
    assert undecided == [], (
        f"routes without an access decision: {undecided}; add each to ROUTE_ROLES (or, if "
        "it must be public, to PUBLIC and to README 'Guarantees') in tests/service/test_authz.py")
    assert sorted(set(ROUTE_ROLES) - routes) == []


@pytest.mark.parametrize(("method", "template"), sorted(ROUTE_ROLES))
@pytest.mark.parametrize(("headers", "message"), [
    ({}, MISSING),
    ({"Authorization": "Bearer obl_not-a-real-token"}, INVALID),
    ({"Authorization": "Bearer " + "obl_" + "x" * 300}, INVALID),
    ({"Authorization": "Bearer not-even-our-prefix"}, INVALID),
    ({"Authorization": "Basic dXNlcjpwdw=="}, MISSING),
    ({"Authorization": "obl_no-scheme"}, MISSING),
], ids=["none", "unknown", "overlong", "foreign", "basic", "no-scheme"])
def test_every_private_route_answers_401_without_a_valid_token(
        api: Api, method: str, template: str, headers: dict[str, str], message: str) -> None:
    r = api.client.request(method, _concrete(template), headers=headers)
    assert r.status_code == 401, r.text
    assert r.json() == _error_body(template, message, "invalid_api_key")
    assert r.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize(("method", "path"), sorted(PUBLIC))
def test_public_routes_answer_without_a_token(api: Api, method: str, path: str) -> None:
    assert api.client.request(method, path).status_code == PUBLIC[(method, path)]


@pytest.mark.parametrize(("method", "template"), sorted(ROUTE_ROLES))
@pytest.mark.parametrize("role", ROLES)
def test_each_route_admits_exactly_its_role_and_above(api: Api, role: str, method: str,
                                                      template: str) -> None:
    lowest, admitted_status = ROUTE_ROLES[(method, template)]
    r = api.client.request(method, _concrete(template), headers=api.headers(role))
    if ROLES.index(role) < ROLES.index(lowest):
        assert r.status_code == 403, r.text
        assert r.json() == _body(f"this needs the {lowest} role; your token is {role}")
    else:
        assert r.status_code == admitted_status, r.text


def test_a_revoked_token_answers_401_at_once(api: Api) -> None:
    secret = api.new_token("operator", "soon-revoked")
    headers = {"Authorization": f"Bearer {secret}"}
    assert api.client.get("/v1/lineages", headers=headers).status_code == 200
    token_id = next(t["id"] for t in api.client.get("/v1/tokens", headers=api.headers()).json()
                    if t["name"] == "soon-revoked")
    r = api.client.delete(f"/v1/tokens/{token_id}", headers=api.headers("admin"))
    assert r.status_code == 200 and r.json()["revoked_at"] is not None
    r = api.client.get("/v1/lineages", headers=headers)
    assert (r.status_code, r.json()) == (401, _body(INVALID))


def _finish(api: Api, ticket_id: str) -> None:
    """Run the queue's own claim and complete (no training): the ticket becomes done."""
    claimed = queue.claim(api.db.sessions, owner="test-worker", lease_seconds=60,
                          max_attempts=3)
    assert [str(t.id) for t in claimed] == [ticket_id]
    assert queue.complete(api.db.sessions, ticket_id=claimed[0].id, owner="test-worker",
                          version_id=None, receipt={"note": "done by the test"})


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_submitters_see_only_their_own_tickets_and_receipts(api: Api) -> None:
    alice = {"Authorization": f"Bearer {api.new_token('submitter', 'alice')}"}
    bob = {"Authorization": f"Bearer {api.new_token('submitter', 'bob')}"}
    mine = api.client.post("/v1/tickets", json=TICKET, headers=alice).json()["id"]
    _finish(api, mine)
    theirs = api.client.post("/v1/tickets", json=TICKET, headers=bob).json()["id"]
    bob_principal = api.client.get(f"/v1/tickets/{theirs}", headers=bob).json()["requester"]

    listed = api.client.get("/v1/tickets", headers=alice)
    assert listed.status_code == 200
    assert [t["id"] for t in listed.json()["items"]] == [mine]
    # Filtering by someone else's requester id shows nothing, not their tickets.
    spy = api.client.get("/v1/tickets", params={"requester": bob_principal}, headers=alice)
    assert (spy.status_code, spy.json()) == (200, {"items": [], "next_cursor": None})

    own_receipt = api.client.get(f"/v1/tickets/{mine}/receipt", headers=alice)
    assert own_receipt.status_code == 200 and own_receipt.json()["ticket_id"] == mine
    for method, path in (("GET", f"/v1/tickets/{mine}"), ("GET", f"/v1/tickets/{mine}/receipt"),
                         ("POST", f"/v1/tickets/{mine}/cancel")):
        r = api.client.request(method, path, headers=bob)
        # Exactly the answer for a ticket that does not exist: existence is not revealed.
        assert (r.status_code, r.json()) == (404, _body(f"ticket {mine} not found")), path
    r = api.client.post(f"/v1/tickets/{theirs}/cancel", headers=alice)
    assert (r.status_code, r.json()) == (404, _body(f"ticket {theirs} not found"))
    assert api.client.get(f"/v1/tickets/{theirs}", headers=bob).json()["status"] == "queued"

    # Operators see everyone's tickets and receipts.
    everyone = api.client.get("/v1/tickets", headers=api.headers("operator")).json()["items"]
    assert {t["id"] for t in everyone} == {mine, theirs}
    r = api.client.get(f"/v1/tickets/{mine}/receipt", headers=api.headers("operator"))
    assert r.status_code == 200 and r.json()["note"] == "done by the test"


def test_operators_promote_roll_back_and_revoke_submitters_cannot(api: Api) -> None:
    """The domain answer (409: nothing to roll back) proves the operator got in."""
    version_id = str(uuid.uuid4())
    calls = [("POST", "/v1/lineages/default/promote", {"version": 1}),
             ("POST", "/v1/lineages/default/rollback", None),
             ("POST", f"/v1/versions/{version_id}/revoke", {"reason": "leaks data"})]
    expected = {"/v1/lineages/default/promote": (404, "no version default@v1"),
                "/v1/lineages/default/rollback":
                    (409, "lineage 'default' has no live version to roll back from"),
                f"/v1/versions/{version_id}/revoke":
                    (404, f"unknown adapter version {version_id}")}
    for method, path, body in calls:
        r = api.client.request(method, path, json=body, headers=api.headers("submitter"))
        assert (r.status_code, r.json()) == (
            403, _body("this needs the operator role; your token is submitter")), path
        for role in ("operator", "admin"):
            r = api.client.request(method, path, json=body, headers=api.headers(role))
            status, message = expected[path]
            assert (r.status_code, r.json()["message"]) == (status, message), (role, path)


def test_only_admins_create_list_and_revoke_tokens(api: Api) -> None:
    for role in ("submitter", "operator"):
        for method, path, body in (("POST", "/v1/tokens", {"role": "admin", "name": "x"}),
                                   ("GET", "/v1/tokens", None),
                                   ("DELETE", f"/v1/tokens/{uuid.uuid4()}", None)):
            r = api.client.request(method, path, json=body, headers=api.headers(role))
            assert (r.status_code, r.json()) == (
                403, _body(f"this needs the admin role; your token is {role}")), (role, path)
    r = api.client.post("/v1/tokens", json={"role": "operator", "name": "ops"},
                        headers=api.headers("admin"))
    assert r.status_code == 201
    created = r.json()
    assert set(created) == {"id", "name", "role", "created_at", "revoked_at", "token"}
    assert created["token"].startswith("obl_") and len(created["token"]) >= 40
    listed = api.client.get("/v1/tokens", headers=api.headers("admin")).json()
    assert all(set(t) == {"id", "name", "role", "created_at", "revoked_at"} for t in listed)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"], indirect=True)
def test_tokens_are_stored_only_as_sha256_hashes(api: Api, tmp_path: Path) -> None:
    from sqlalchemy import select, text

    from storage.models import ApiToken

    created = api.client.post("/v1/tokens", json={"role": "submitter", "name": "hashed"},
                              headers=api.headers("admin")).json()["token"]
    with api.db.sessions() as s:
        hashes = set(s.scalars(select(ApiToken.token_hash)))
        # Everything the database holds, as text: no secret anywhere in it.
        dump = " ".join(str(row) for table in ("api_tokens", "audit_events")
                        for row in s.execute(text(f"SELECT * FROM {table}")))
    for secret in [*api.secrets.values(), created]:
        assert tokens.hash_secret(secret) in hashes
        assert secret not in dump and secret[4:] not in dump


def test_token_check_is_constant_time(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """authenticate() compares hashes with hmac.compare_digest, never with ==."""
    import hmac

    calls: list[tuple[str, str]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert api.client.get("/v1/tickets", headers=api.headers("submitter")).status_code == 200
    digest = tokens.hash_secret(api.secrets["submitter"])
    assert (digest, digest) in calls


def test_tokens_never_reach_the_logs(api: Api, caplog: pytest.LogCaptureFixture,
                                     capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "obl_" + "w" * 43
    for headers in (api.headers("submitter"), api.headers("admin"),
                    {"Authorization": f"Bearer {wrong}"}):
        api.client.get("/v1/tickets", headers=headers)
        api.client.post("/v1/tickets", json={"kind": "nope"}, headers=headers)
        api.client.get("/v1/tickets/not-a-uuid", headers=headers)
    created = api.client.post("/v1/tokens", json={"role": "submitter", "name": "logged?"},
                              headers=api.headers("admin")).json()["token"]
    out, err = capfd.readouterr()
    logged = caplog.text + out + err
    for secret in [*api.secrets.values(), wrong, created]:
        assert secret not in logged


@pytest.fixture
def limited_api(db: Any, tmp_path: Path):
    yield from start_api(db, make_settings(tmp_path, db.url, rate_limit_per_second=0.5,
                                           rate_limit_burst=3))


def test_rate_limit_is_per_token_with_429_and_retry_after(limited_api: Api) -> None:
    api = limited_api
    statuses = [api.client.get("/v1/tickets", headers=api.headers("submitter")).status_code
                for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    r = api.client.get("/v1/tickets", headers=api.headers("submitter"))
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "2"  # one request per 2 s, rounded up
    assert r.json() == _body("rate limit of 0.5 requests per second for this token "
                             "exceeded; retry in 2 s")
    # Another token has its own bucket; health checks are never limited.
    assert api.client.get("/v1/tickets", headers=api.headers("operator")).status_code == 200
    assert all(api.client.get("/healthz").status_code == 200 for _ in range(10))


def test_rate_limiter_refills_at_its_rate() -> None:
    from service.rate_limit import RateLimiter

    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=2, clock=lambda: now[0])
    assert [limiter.acquire("t") for _ in range(2)] == [None, None]
    assert limiter.acquire("t") == pytest.approx(0.5)
    now[0] += 0.5
    assert limiter.acquire("t") is None
    assert limiter.acquire("other") is None
    assert RateLimiter(rate=0, burst=1).acquire("t") is None  # 0 disables


def test_created_tokens_work_with_their_role(api: Api) -> None:
    with transaction(api.db.sessions) as s:
        _token, secret = tokens.create_token(s, role="operator", name="fresh")
    r = api.client.get("/v1/lineages", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200 and [lin["name"] for lin in r.json()] == ["default"]

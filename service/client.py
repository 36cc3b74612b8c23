"""A small Python client for the oblivio HTTP API (used by the CLI; usable from scripts).

    client = OblivioClient("http://127.0.0.1:8000", token="obl_...")
    ticket = client.submit_ticket({"kind": "forget", "target": "Marie Curie",
                                   "forget": {"texts": ["..."]}})
    with client.stream_answer("Who discovered polonium?") as answer:
        print("".join(answer.pieces), answer.model)   # pieces arrive as they are decoded
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx


class ApiError(Exception):
    """The API refused a request (4xx/5xx); `message` is the server's readable message."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


class ApiUnreachable(ApiError):
    """No HTTP answer at all: the server is down, or the URL is wrong."""

    def __init__(self, base_url: str, reason: str) -> None:
        super().__init__(0, f"cannot reach the oblivio API at {base_url} ({reason}); "
                            "is `oblivio serve` running?")
        self.base_url = base_url


class OblivioClient:
    def __init__(self, base_url: str, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OblivioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- tickets ----------------------------------------------------------------------
    def submit_ticket(self, body: dict[str, Any], *, idempotency_key: str | None = None
                      ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/tickets", json=body, headers=headers)

    def get_ticket(self, ticket_id: uuid.UUID | str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tickets/{ticket_id}")

    def list_tickets(self, *, status: str | None = None, lineage: str | None = None,
                     limit: int | None = None, cursor: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "lineage": lineage, "limit": limit,
                                    "cursor": cursor}.items() if v is not None}
        return self._call("GET", "/v1/tickets", params=params)

    def cancel_ticket(self, ticket_id: uuid.UUID | str) -> dict[str, Any]:
        return self._call("POST", f"/v1/tickets/{ticket_id}/cancel")

    def revoke_ticket(self, ticket_id: uuid.UUID | str, *, reason: str) -> dict[str, Any]:
        """Queue the withdrawal of a done ticket's forgetting; returns the revoke ticket."""
        return self._call("POST", f"/v1/tickets/{ticket_id}/revoke", json={"reason": reason})

    def receipt(self, ticket_id: uuid.UUID | str) -> dict[str, Any]:
        return self._call("GET", f"/v1/tickets/{ticket_id}/receipt")

    # --- lineages and versions --------------------------------------------------------
    def list_lineages(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/lineages")

    def create_lineage(self, name: str, *, base_model: str | None = None,
                       engine: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name}
        if base_model:
            body["base_model"] = base_model
        if engine:
            body["engine"] = engine
        return self._call("POST", "/v1/lineages", json=body)

    def list_versions(self, lineage: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/lineages/{lineage}/versions")

    def promote(self, lineage: str, version: int, *, alias: str = "live") -> dict[str, Any]:
        return self._call("POST", f"/v1/lineages/{lineage}/promote",
                          json={"version": version, "alias": alias})

    def rollback(self, lineage: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/lineages/{lineage}/rollback")

    def revoke(self, version_id: uuid.UUID | str, *, reason: str,
               tickets: str = "requeue") -> dict[str, Any]:
        return self._call("POST", f"/v1/versions/{version_id}/revoke",
                          json={"reason": reason, "tickets": tickets})

    # --- tokens -----------------------------------------------------------------------
    # --- datasets and fine-tunes (S3T) ----------------------------------------------------
    def add_dataset_jsonl(self, name: str, jsonl: str) -> dict[str, Any]:
        return self._call("POST", "/v1/datasets", params={"name": name}, content=jsonl,
                          headers={"Content-Type": "application/jsonl"})

    def get_dataset(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/datasets/{name}")

    def finetune(self, lineage: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", f"/v1/lineages/{lineage}/finetune", json=body)

    def create_token(self, *, role: str, name: str) -> dict[str, Any]:
        return self._call("POST", "/v1/tokens", json={"role": role, "name": name})

    # --- answers ----------------------------------------------------------------------
    def generate(self, prompt: str, *, lineage: str = "default", version: str | None = None,
                 max_new_tokens: int = 64) -> dict[str, Any]:
        """The whole answer of the lineage's live version (or `version`: vN, candidate,
        base, a version id) and which version gave it."""
        return self._call("POST", "/v1/generate", json={
            "prompt": prompt, "lineage": lineage, "version": version,
            "max_new_tokens": max_new_tokens})

    @contextmanager
    def stream_answer(self, prompt: str, *, lineage: str = "default",
                      version: str | None = None,
                      max_new_tokens: int = 64) -> Iterator[AnswerStream]:
        """As `generate`, as the model decodes it: `with client.stream_answer(q) as a:
        for piece in a.pieces: ...` (the OpenAI-compatible endpoint's stream)."""
        body = {"model": lineage if version is None else f"{lineage}@{version}",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_new_tokens, "stream": True}
        with self._transport_errors(), \
                self._http.stream("POST", "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                response.read()
                raise _api_error(response)
            yield AnswerStream(model=response.headers.get("X-Oblivio-Version", body["model"]),
                               pieces=_sse_pieces(response))

    @contextmanager
    def _transport_errors(self) -> Iterator[None]:
        try:
            yield
        except httpx.TimeoutException:
            raise ApiUnreachable(self.base_url, "no answer in time") from None
        except httpx.TransportError as exc:
            raise ApiUnreachable(self.base_url, type(exc).__name__) from None

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        with self._transport_errors():
            response = self._http.request(method, path, **kwargs)
        if response.is_success:
            return response.json()
        raise _api_error(response)


@dataclass
class AnswerStream:
    """An answer on its way: the version answering (`lineage@vN`, or `lineage@base`) and
    its text pieces, which join to the whole answer."""

    model: str
    pieces: Iterator[str]


def _sse_pieces(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        delta = json.loads(data)["choices"][0]["delta"]
        if delta.get("content"):
            yield delta["content"]


def _api_error(response: httpx.Response) -> ApiError:
    """The server's readable message: oblivio's `{"message"}` / `{"detail"}`, or the
    OpenAI-compatible endpoints' `{"error": {"message"}}`."""
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    error = body.get("error")
    message = body.get("message") or (error.get("message") if isinstance(error, dict) else None)
    if not message:
        detail = body.get("detail")
        message = detail if isinstance(detail, str) else f"HTTP {response.status_code}"
    return ApiError(response.status_code, message, body.get("detail"))

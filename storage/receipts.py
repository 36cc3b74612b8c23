"""Deletion receipts: what was done for a ticket, as a signed document an auditor can file.

A receipt holds the ticket and its requester, the forget set's hash (never its text), the
engine and how it was configured, every version and artifact with its sha256, the
evaluation before/after with pass/fail against the thresholds, the timestamps of each
phase, and room for an exactness proof (S3T). It is signed with HMAC-SHA256 over its
canonical JSON (sorted keys, no whitespace, UTF-8), so any change to any field - a metric,
a hash, a timestamp - makes verification fail.

`build_receipt` reads the database; `sign_receipt` / `verify_receipt` are pure and are
what `oblivio receipt verify` runs on a saved file. The key comes from the caller (the
service reads it from settings); functions here never commit.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from storage import tickets
from storage.models import AdapterVersion, AuditEvent, Job, Ticket

RECEIPT_FORMAT = "oblivio-receipt/1"
SIGNATURE_ALGORITHM = "HMAC-SHA256"
# Metric keys a job stores that are worth a line of their own on a receipt.
_LEGACY_CHECKS = (("forget_ratio", "<=", 0.2), ("utility_ratio", ">=", 0.9))


def canonical_json(value: Any) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def key_id(key: bytes) -> str:
    """A short public name of a key (which key signed this), not the key."""
    return hashlib.sha256(b"oblivio-receipt-key:" + key).hexdigest()[:16]


def _signed_bytes(body: dict[str, Any], algorithm: str, kid: str) -> bytes:
    # The algorithm and key id are signed too: neither can be swapped without detection.
    return canonical_json({"receipt": body, "algorithm": algorithm, "key_id": kid})


def sign_receipt(body: dict[str, Any], key: bytes) -> dict[str, Any]:
    """`body` plus a `signature` field: {"algorithm", "key_id", "value"}."""
    if not key:
        raise ValueError("the receipt signing key is empty")
    if "signature" in body:
        raise ValueError("the receipt is already signed")
    # Round-trip through JSON first: what is signed is exactly what a reader gets back.
    body = json.loads(canonical_json(body))
    kid = key_id(key)
    value = hmac.new(key, _signed_bytes(body, SIGNATURE_ALGORITHM, kid), hashlib.sha256)
    return {**body, "signature": {"algorithm": SIGNATURE_ALGORITHM, "key_id": kid,
                                  "value": value.hexdigest()}}


@dataclass(frozen=True)
class Verification:
    valid: bool
    message: str


def verify_receipt(document: Any, key: bytes) -> Verification:
    """Check a signed receipt (as parsed from its JSON) against `key`."""
    if not isinstance(document, dict):
        return Verification(False, "not a receipt: expected a JSON object")
    signature = document.get("signature")
    if not isinstance(signature, dict) or not isinstance(signature.get("value"), str):
        return Verification(False, "the receipt carries no signature")
    if signature.get("algorithm") != SIGNATURE_ALGORITHM:
        return Verification(False, f"unsupported signature algorithm "
                                   f"{signature.get('algorithm')!r}")
    kid = key_id(key)
    if signature.get("key_id") != kid:
        return Verification(False, f"signed with key {signature.get('key_id')!r}, but the key "
                                   f"given is {kid!r}")
    body = {k: v for k, v in document.items() if k != "signature"}
    try:
        expected = hmac.new(key, _signed_bytes(body, SIGNATURE_ALGORITHM, kid),
                            hashlib.sha256).hexdigest()
    except ValueError as exc:  # NaN/Infinity cannot have been signed
        return Verification(False, f"the receipt holds values that cannot be signed: {exc}")
    if not hmac.compare_digest(expected, signature["value"]):
        return Verification(False, "signature mismatch: the receipt was changed after it was "
                                   "signed (or signed with another key)")
    return Verification(True, f"valid receipt for ticket {document.get('ticket_id')} "
                              f"(key {kid})")


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _checks(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Pass/fail lines: the job's own `checks` when it stored them, else the two ratios."""
    if isinstance(metrics.get("checks"), list):
        return metrics["checks"]
    thresholds = metrics.get("thresholds") or {}
    out = []
    for name, op, default in _LEGACY_CHECKS:
        value = metrics.get(name)
        if value is None:
            continue
        threshold = thresholds.get(name, default)
        passed = value <= threshold if op == "<=" else value >= threshold
        base = name.removesuffix("_ratio")
        out.append({"name": name, "before": metrics.get(f"{base}_rate_before"),
                    "after": metrics.get(f"{base}_rate_after"), "value": value, "op": op,
                    "threshold": threshold, "passed": bool(passed)})
    return out


def _phases(session: Session, ticket: Ticket, job: Job | None,
            version: AdapterVersion | None) -> dict[str, Any]:
    subjects = [("ticket", str(ticket.id))]
    if version is not None:
        subjects.append(("version", str(version.id)))
    events = session.scalars(
        select(AuditEvent).where(or_(*[(AuditEvent.subject_type == t) & (AuditEvent.subject_id == i)
                                       for t, i in subjects]))
        .order_by(AuditEvent.at, AuditEvent.id)).all()
    phases: dict[str, Any] = {
        "submitted_at": _iso(ticket.created_at),
        "job_started_at": _iso(job.started_at) if job else None,
        "job_finished_at": _iso(job.finished_at) if job else None,
        "version_created_at": _iso(version.created_at) if version else None,
        "completed_at": _iso(ticket.updated_at),
        "events": [{"at": _iso(e.at), "action": e.action, "actor": e.actor} for e in events],
    }
    # Per-phase timings the job recorded (if any), e.g. {"training": {"started_at": ...}}.
    if job is not None and isinstance((job.progress or {}).get("phases"), dict):
        phases["job_phases"] = job.progress["phases"]
    return phases


def build_receipt(session: Session, *, ticket_id: uuid.UUID,
                  requester: str | None = None) -> dict[str, Any]:
    """The (unsigned) receipt of a done ticket; Conflict until it is done, NotFound if it
    is not the requester's."""
    base = tickets.receipt(session, ticket_id=ticket_id, requester=requester)
    ticket = tickets.get_ticket(session, ticket_id, requester=requester)
    version = (session.get(AdapterVersion, ticket.result_version_id)
               if ticket.result_version_id else None)
    job = session.get(Job, ticket.job_id) if ticket.job_id else None
    if job is None and version is not None and version.job_id is not None:
        job = session.get(Job, version.job_id)
    metrics: dict[str, Any] = dict(base.get("metrics") or {})
    worker = ticket.receipt or {}

    artifacts = []
    if version is not None and version.sha256:
        artifacts.append({"name": "adapter version", "object_key": version.object_key,
                          "sha256": version.sha256, "size": version.size})
    report = metrics.get("report")
    if isinstance(report, dict) and report.get("sha256"):
        artifacts.append({"name": "evaluation report", "object_key": report.get("object_key"),
                          "sha256": report["sha256"], "path_in_version": report.get("path")})
    for extra in worker.get("artifacts") or metrics.get("artifacts") or []:
        if isinstance(extra, dict) and extra.get("sha256") and extra not in artifacts:
            artifacts.append(extra)
    base_sha = base.get("base_model_sha256")
    if base_sha:
        artifacts.append({"name": "base model", "object_key": None, "sha256": base_sha,
                          "model": base.get("base_model")})

    evaluation = {
        "verdict": metrics.get("verdict"),
        "compared_with": metrics.get("compared_with", ["base"]),
        "checks": _checks(metrics),
        "report": metrics.get("report"),
    }
    method = worker.get("method") or (job.method_config if job and job.method_config else None)
    return {
        **base,
        "format": RECEIPT_FORMAT,
        "requester": ticket.requester,
        "forget_set_sha256": ticket.payload_sha256,
        "method_config": method or metrics.get("method"),
        "job_id": str(job.id) if job else base.get("job_id"),
        "artifacts": artifacts,
        "evaluation": evaluation,
        "phases": _phases(session, ticket, job, version),
        # Filled by engines that delete exactly (S3T): which slices/layers were cut, the
        # hashes of the records every kept checkpoint saw. None for approximate forgetting.
        "exactness_proof": worker.get("exactness_proof") or metrics.get("exactness_proof"),
    }

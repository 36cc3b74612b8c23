"""Audit trail: every change to a ticket, version, alias or token writes one row."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from storage.models import AuditEvent


def record(session: Session, *, actor: str, action: str, subject_type: str, subject_id: object,
           detail: dict[str, Any] | None = None) -> AuditEvent:
    """Add an audit event to the caller's transaction (so it commits or rolls back with it)."""
    event = AuditEvent(actor=actor, action=action, subject_type=subject_type,
                       subject_id=str(subject_id), detail=detail)
    session.add(event)
    return event

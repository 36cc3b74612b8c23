"""/v1/versions/{id}: one adapter version, and revoking it (operators)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from service.api.lineages import version_out
from service.deps import OperatorDep, SessionDep
from service.schemas.lineages import RevokeIn, VersionOut
from storage import registry
from storage.models import Lineage

router = APIRouter(prefix="/v1/versions", tags=["versions"])


@router.get("/{version_id}", response_model=VersionOut)
def get_version(version_id: uuid.UUID, session: SessionDep, _caller: OperatorDep) -> VersionOut:
    version = registry.get_version(session, version_id)
    return version_out(session, version, session.get_one(Lineage, version.lineage_id))


@router.post("/{version_id}/revoke", response_model=VersionOut)
def revoke(version_id: uuid.UUID, body: RevokeIn, session: SessionDep,
           caller: OperatorDep) -> VersionOut:
    """Withdraw a version for good; if it was live, live falls back to the previous one and
    its done tickets are reopened. Its tickets awaiting review are requeued or failed
    (`tickets`)."""
    version = registry.revoke(session, version_id=version_id, actor=caller.principal,
                              reason=body.reason, tickets=body.tickets)
    session.flush()
    return version_out(session, version, session.get_one(Lineage, version.lineage_id))

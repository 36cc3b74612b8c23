"""/v1/schedules: batch unlearning windows per lineage (operators)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter

from service.deps import OperatorDep, SessionDep
from service.schemas.schedules import ScheduleIn, ScheduleOut
from storage import schedules
from storage.models import Lineage

router = APIRouter(prefix="/v1/schedules", tags=["schedules"])


@router.post("", status_code=201, response_model=ScheduleOut)
def create(body: ScheduleIn, session: SessionDep, caller: OperatorDep) -> ScheduleOut:
    """`unlearn`: from now on the lineage's tickets wait and are unlearned together at each
    window (tickets already queued for it wait too); `retrain`: an S3T lineage's background
    retrains wait for the window; `evaluate`: each window re-evaluates the live version's
    utility.
    409 if the lineage already has a schedule of that action; 422 if the action does not fit
    the lineage's engine."""
    schedule = schedules.create_schedule(
        session, lineage_name=body.lineage, cron=body.cron, min_tickets=body.min_tickets,
        max_tickets=body.max_tickets, action=body.action, actor=caller.principal)
    return ScheduleOut.build(schedule, body.lineage,
                             schedules.waiting_count(session, schedule))


@router.get("", response_model=list[ScheduleOut])
def list_all(session: SessionDep, _caller: OperatorDep) -> list[ScheduleOut]:
    return [ScheduleOut.build(s, name, waiting)
            for s, name, waiting in schedules.list_schedules(session)]


@router.get("/{schedule_id}", response_model=ScheduleOut)
def get_one(schedule_id: uuid.UUID, session: SessionDep, _caller: OperatorDep) -> ScheduleOut:
    schedule = schedules.get_schedule(session, schedule_id)
    lineage = session.get_one(Lineage, schedule.lineage_id)
    return ScheduleOut.build(schedule, lineage.name,
                             schedules.waiting_count(session, schedule))


@router.delete("/{schedule_id}")
def remove(schedule_id: uuid.UUID, session: SessionDep, caller: OperatorDep) -> dict[str, Any]:
    """Delete it; the tickets it held go back to the normal queue (their count is returned)."""
    released = schedules.delete_schedule(session, schedule_id=schedule_id,
                                         actor=caller.principal)
    return {"deleted": str(schedule_id), "released_tickets": released}

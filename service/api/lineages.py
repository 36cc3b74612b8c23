"""/v1/lineages: lineages, their versions, and moving the `live` alias (operators)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.deps import OperatorDep, SessionDep, SettingsDep
from service.schemas.common import NAME_PATTERN
from service.schemas.lineages import LineageIn, LineageOut, PromoteIn, VersionOut
from storage import registry
from storage.errors import Conflict
from storage.models import AdapterVersion, Alias, Lineage

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])

LineageName = Annotated[str, Path(pattern=NAME_PATTERN,
                                  description="Lineage name, e.g. `default`.")]


def aliases_by_version(session: Session, lineage: Lineage) -> dict[object, list[str]]:
    rows = session.execute(select(Alias.version_id, Alias.name)
                           .where(Alias.lineage_id == lineage.id).order_by(Alias.name)).tuples()
    out: dict[object, list[str]] = {}
    for version_id, name in rows:
        out.setdefault(version_id, []).append(name)
    return out


def lineage_out(session: Session, lineage: Lineage) -> LineageOut:
    rows = session.execute(select(Alias.name, AdapterVersion.version)
                           .join(AdapterVersion, AdapterVersion.id == Alias.version_id)
                           .where(Alias.lineage_id == lineage.id)).tuples()
    return LineageOut.build(lineage, {name: registry.version_label(lineage.name, number)
                                      for name, number in rows})


def version_out(session: Session, version: AdapterVersion, lineage: Lineage) -> VersionOut:
    return VersionOut.build(version, lineage.name,
                            aliases_by_version(session, lineage).get(version.id, []))


@router.get("", response_model=list[LineageOut])
def list_lineages(session: SessionDep, _caller: OperatorDep) -> list[LineageOut]:
    return [lineage_out(session, lineage) for lineage in registry.list_lineages(session)]


@router.post("", status_code=201, response_model=LineageOut)
def create_lineage(body: LineageIn, session: SessionDep, settings: SettingsDep,
                   caller: OperatorDep) -> LineageOut:
    """A new lineage on a base model (default: the service's); 409 if the name is taken."""
    if session.scalar(select(Lineage.id).where(Lineage.name == body.name)) is not None:
        raise Conflict(f"lineage {body.name!r} already exists")
    lineage = registry.ensure_lineage(session, name=body.name,
                                      base_model=body.base_model or settings.base_model,
                                      engine=body.engine)
    return lineage_out(session, lineage)


@router.get("/{name}", response_model=LineageOut)
def get_lineage(name: LineageName, session: SessionDep, _caller: OperatorDep) -> LineageOut:
    return lineage_out(session, registry.get_lineage(session, name))


@router.get("/{name}/versions", response_model=list[VersionOut])
def list_versions(name: LineageName, session: SessionDep,
                  _caller: OperatorDep) -> list[VersionOut]:
    lineage = registry.get_lineage(session, name)
    aliases = aliases_by_version(session, lineage)
    return [VersionOut.build(v, lineage.name, aliases.get(v.id, []))
            for v in registry.list_versions(session, lineage_name=name)]


@router.post("/{name}/promote", response_model=VersionOut)
def promote(name: LineageName, body: PromoteIn, session: SessionDep,
            caller: OperatorDep) -> VersionOut:
    """Point `live` (or `candidate`) at a ready version; serving follows `live`."""
    version = registry.promote(session, lineage_name=name, version=body.version,
                               actor=caller.principal, alias=body.alias)
    session.flush()
    return version_out(session, version, registry.get_lineage(session, name))


@router.post("/{name}/rollback", response_model=VersionOut)
def rollback(name: LineageName, session: SessionDep, caller: OperatorDep) -> VersionOut:
    """Move `live` back to the previous servable version; answers the version now live."""
    version = registry.rollback(session, lineage_name=name, actor=caller.principal)
    session.flush()
    return version_out(session, version, registry.get_lineage(session, name))

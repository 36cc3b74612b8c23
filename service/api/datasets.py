"""/v1/datasets: register fine-tuning records (JSON or JSONL) and read their placement."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from service.deps import OperatorDep, SessionDep
from service.schemas.datasets import DatasetIn, DatasetName, DatasetOut, RecordIn
from storage import datasets

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

JSONL_TYPES = ("application/jsonl", "application/x-ndjson", "application/x-jsonlines",
               "text/plain")
_RECORDS = TypeAdapter(list[RecordIn])

_BODY_DOC = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": DatasetIn.model_json_schema()},
        "application/jsonl": {"schema": {"type": "string", "description":
                              "One record per line; the dataset name in `?name=`."}}}}}


@router.post("", status_code=201, response_model=DatasetOut, openapi_extra=_BODY_DOC)
async def add_dataset(request: Request, response: Response, session: SessionDep,
                      caller: OperatorDep,
                      name: Annotated[DatasetName | None, Query(
                          description="Dataset name, for a JSONL body.")] = None) -> DatasetOut:
    """Register records: `{"name", "records": [...]}` as JSON, or one record per line
    (JSONL, `?name=`). A new name answers 201; adding to a dataset not yet fine-tuned, 200.
    A record id repeated in the upload is a 422, one the dataset already has a 409."""
    raw = await request.body()
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
    body = _parse_jsonl(raw, name) if kind in JSONL_TYPES else _parse_json(raw)
    dataset, created = datasets.add_records(
        session, name=body.name, records=[r.model_dump(exclude_none=True) for r in body.records],
        actor=caller.principal)
    if not created:
        response.status_code = 200
    return DatasetOut.model_validate(datasets.summary(session, dataset))


@router.get("/{name}", response_model=DatasetOut)
def get_dataset(name: Annotated[str, Path(max_length=128)], session: SessionDep,
                _caller: OperatorDep) -> DatasetOut:
    """Record, deletion and subject counts; shards and their slices once fine-tuned."""
    return DatasetOut.model_validate(datasets.summary(session, datasets.get_dataset(session,
                                                                                     name)))


def _errors(exc: ValidationError, prefix: tuple[Any, ...]) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": ("body", *prefix, *e["loc"])}
                                   for e in exc.errors()])


def _parse_json(raw: bytes) -> DatasetIn:
    try:
        return DatasetIn.model_validate_json(raw or b"null")
    except ValidationError as exc:
        raise _errors(exc, ()) from None


def _parse_jsonl(raw: bytes, name: str | None) -> DatasetIn:
    if not name:
        raise RequestValidationError([{"type": "missing", "loc": ("query", "name"),
                                       "msg": "a JSONL upload needs ?name=<dataset>"}])
    items = []
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise RequestValidationError([{"type": "json_invalid", "loc": ("line", number),
                                           "msg": f"line {number} is not JSON ({exc.msg})"}]
                                         ) from None
    if not items:
        raise RequestValidationError([{"type": "too_short", "loc": ("body",),
                                       "msg": "the upload has no records"}])
    try:
        records = _RECORDS.validate_python(items)
    except ValidationError as exc:
        # loc (index, field) -> line number, field
        raise RequestValidationError([
            {**e, "loc": ("line", int(e["loc"][0]) + 1, *e["loc"][1:])} if e["loc"] else e
            for e in exc.errors()]) from None
    return DatasetIn(name=name, records=records)

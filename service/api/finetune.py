"""/v1/lineages/{name}/finetune: fine-tune a lineage on a registered dataset (S3T).

The request becomes an internal `finetune` ticket in the same durable queue as deletions,
run by the same dispatcher and job runner, and its version goes through the same registry;
the job row exists from submission on, so the answer carries its id.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api.lineages import LineageName
from service.deps import OperatorDep, SessionDep
from service.schemas.datasets import FinetuneIn, FinetuneOut
from storage import tickets

router = APIRouter(prefix="/v1/lineages", tags=["lineages"])


@router.post("/{name}/finetune", status_code=202, response_model=FinetuneOut)
def finetune(name: LineageName, body: FinetuneIn, session: SessionDep,
             caller: OperatorDep) -> FinetuneOut:
    """Queue a fine-tune; follow it at GET /v1/jobs/{job_id} (or the ticket). When it ends
    the lineage's new version is live."""
    from workers.engines.base import EngineRequest
    from workers.engines.registry import get_engine

    options = body.engine_options()
    get_engine(body.engine).validate(EngineRequest(kind="finetune", engine=body.engine,
                                                   dataset=body.dataset, options=options))
    submitted = tickets.submit_finetune(session, lineage_name=name, dataset=body.dataset,
                                        engine=body.engine, options=options,
                                        requester=caller.principal)
    return FinetuneOut(job_id=submitted.job.id, ticket_id=submitted.ticket.id, lineage=name,
                       dataset=body.dataset, engine=body.engine,
                       status=submitted.ticket.status.value)

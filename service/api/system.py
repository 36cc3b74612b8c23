"""/v1/system: what this service runs on (versions, Ray dashboard, dispatcher state)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.deps import OperatorDep

router = APIRouter(prefix="/v1", tags=["system"])


@router.get("/system")
def system(request: Request, _caller: OperatorDep) -> dict[str, Any]:
    settings = request.app.state.settings
    runtime = getattr(request.app.state, "runtime", None)
    info: dict[str, Any] = dict(runtime.info) if runtime is not None else {}
    return {
        "base_model": settings.base_model,
        "database": settings.resolved_database_url.split("://", 1)[0],
        "object_store": settings.resolved_object_store.split("://", 1)[0],
        "device": settings.device,
        "num_workers": settings.num_workers,
        "zero_stage": settings.zero_stage,
        "ray_dashboard": info.get("ray_dashboard"),
        "dispatcher": runtime.dispatcher_status() if runtime is not None else None,
        "serving": getattr(request.app.state, "generator", None) is not None,
    }

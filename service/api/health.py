"""Liveness, readiness and Prometheus metrics; no authentication (for probes and scrapers)."""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up and serving requests."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is unreachable"}})
def readyz(request: Request) -> JSONResponse:
    """The database and the object store answer and the data dir has room; 503 names the
    ones that do not."""
    app = request.app
    timeout = app.state.settings.readyz_timeout_seconds

    def database() -> None:
        with app.state.sessions() as session:
            session.execute(text("SELECT 1"))

    def object_store() -> None:
        _object_store(app).ping()

    def data_dir() -> None:
        settings = app.state.settings
        path = settings.data_dir if settings.data_dir.exists() else settings.data_dir.parent
        free = shutil.disk_usage(path).free
        if free < settings.min_free_disk_bytes:
            raise OSError(f"only {free} bytes free in {settings.data_dir.resolve()} "
                          f"(OBLIVIO_MIN_FREE_DISK_BYTES is {settings.min_free_disk_bytes})")

    checks = {name: _check(fn, timeout) for name, fn in
              (("database", database), ("object_store", object_store),
               ("data_dir", data_dir))}
    failed = [name for name, result in checks.items() if result != "ok"]
    if failed:
        message = "not ready: " + "; ".join(f"{name}: {checks[name]}" for name in failed)
        return JSONResponse({"status": "unavailable", "message": message, "detail": message,
                             "checks": checks}, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus text format; ticket counts are read from the database at scrape time."""
    return Response(generate_latest(request.app.state.metrics.registry),
                    media_type=CONTENT_TYPE_LATEST)


def _object_store(app: Any) -> Any:
    # Built on first use, not at start-up: the S3 backend imports boto3, which the API's
    # import path must stay free of, and a bad store URL should fail readiness, not start-up.
    with app.state.object_store_lock:
        if app.state.object_store is None:
            app.state.object_store = app.state.settings.store_config().open()
        return app.state.object_store


def _check(fn: Callable[[], None], timeout: float) -> str:
    """'ok', or why not. Runs in its own thread so that a hung dependency costs `timeout`."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        pool.submit(fn).result(timeout=timeout)
        return "ok"
    except concurrent.futures.TimeoutError:
        return f"no answer within {timeout:g} s"
    except Exception as exc:  # any failure means not ready; say which and why
        log.warning("readiness check failed: %s", exc)
        return f"{type(exc).__name__}: {exc}"[:500]
    finally:
        pool.shutdown(wait=False)

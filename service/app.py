"""The FastAPI application factory: `create_app(settings)`.

Keep this import path light: no torch, ray, deepspeed, transformers or boto3 (a test
checks), so the API starts in well under a second and runs where those are absent.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service.api import (
    dashboard,
    datasets,
    finetune,
    generate,
    health,
    jobs,
    lineages,
    openai_compat,
    schedules,
    system,
    tickets,
    tokens,
    versions,
)
from service.api.errors import install_error_handlers
from service.body_limit import BodySizeLimitMiddleware
from service.concurrency import ConcurrencyLimitMiddleware
from service.metrics import AppMetrics, RequestCounterMiddleware
from service.rate_limit import RateLimiter
from service.settings import Settings, get_settings
from service.startup import prepare
from storage.db import make_engine, make_session_factory

API_VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    """An app bound to `settings` (default: from the environment).

    Start-up (the lifespan) migrates the database, makes sure the `default` lineage exists
    and, on the embedded default, writes the first admin token to `<data_dir>/admin-token`.
    """
    settings = settings or get_settings()
    engine = make_engine(settings.resolved_database_url)
    sessions = make_session_factory(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.startup is None:  # `oblivio serve` may have prepared already
            app.state.startup = await run_in_threadpool(prepare, settings, sessions)
        try:
            yield
        finally:
            engine.dispose()

    app = FastAPI(
        title="oblivio",
        version=API_VERSION,
        summary="Continual machine unlearning for language models: deletion tickets in, "
                "versioned adapters out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = sessions
    app.state.startup = None  # StartupReport once prepared
    app.state.object_store = None  # built on first /readyz, see service.api.health
    app.state.object_store_lock = threading.Lock()
    app.state.payload_cipher = None  # service.deps.payload_cipher, made on first use
    app.state.payload_cipher_lock = threading.Lock()
    app.state.metrics = AppMetrics(sessions)
    app.state.rate_limiter = RateLimiter(rate=settings.rate_limit_per_second,
                                         burst=settings.rate_limit_burst)
    app.state.runtime = None  # workers.runtime.Runtime when `oblivio serve` started Ray
    app.state.generator = None  # its Ray Serve handle for /v1/generate

    install_error_handlers(app)
    for module in (health, tickets, jobs, lineages, versions, tokens, generate, system,
                   datasets, finetune):
        app.include_router(module.router)
    app.include_router(openai_compat.router)  # /v1/chat/completions, /v1/models
    app.include_router(dashboard.router)  # /dashboard and the JSON it reads
    app.include_router(schedules.router)  # /v1/schedules
    # Added last = outermost: the counter also sees the 413s of the size limit.
    app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_in_flight_requests)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestCounterMiddleware, metrics=app.state.metrics)
    return app

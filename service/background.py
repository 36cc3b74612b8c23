"""What `oblivio serve` runs beside the API: Ray, the dispatcher and the generation deployment.

Heavy imports (ray, torch) stay inside the function so the API import path remains light.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from service.settings import Settings

log = logging.getLogger(__name__)


class BackgroundWorkers(Protocol):
    def stop(self) -> None: ...


def start_background_workers(settings: Settings, app: Any = None) -> BackgroundWorkers | None:
    """Start Ray (local or `OBLIVIO_RAY_ADDRESS`), the dispatcher actor and Ray Serve.

    With `app`, the runtime and the generation handle are attached to `app.state` so that
    /v1/generate and /v1/system can use them.
    """
    try:
        from workers.runtime import start_runtime
    except ImportError:
        log.info("workers package not installed; the API runs without a dispatcher")
        return None
    from pydantic import SecretStr

    from storage import sealing

    # Workers run in other processes (Ray), maybe with another working directory: hand
    # them the key itself rather than a path to find it by.
    key = sealing.load_or_create_key(settings.payload_key_text, settings.payload_key_file)
    settings = settings.model_copy(update={"payload_key": SecretStr(sealing.encode_key(key))})
    runtime = start_runtime(settings)
    if app is not None:
        app.state.runtime = runtime
        app.state.generator = runtime.generator
    dashboard = runtime.info.get("ray_dashboard")
    if dashboard:
        print(f"Ray dashboard:   {dashboard}", flush=True)
    return runtime

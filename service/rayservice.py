"""The Ray Serve application a KubeRay RayService runs: `import_path: service.rayservice:app`.

One Serve app holds the whole service: the FastAPI API as an ingress deployment (any
number of replicas; the database is the only shared state), the Generator deployment it
answers from, the dispatcher actor and the in-service scheduler (see
workers.serve_ingress). Configuration comes from `OBLIVIO_*` environment variables
(ConfigMap + Secret), read once here.
"""

from __future__ import annotations

from typing import Any

from service.app import create_app
from service.settings import get_settings
from workers.serve_ingress import build_ingress_app

settings = get_settings()
api = create_app(settings)


def _start_scheduler() -> Any:
    from service.scheduler import SchedulerLoop

    return SchedulerLoop(settings, api.state.sessions).start()


app = build_ingress_app(api, settings.worker_config(),
                        start_scheduler=_start_scheduler if settings.scheduler_enabled else None)

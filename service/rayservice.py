"""The Ray Serve application a KubeRay RayService runs: `import_path: service.rayservice:app`.

One Serve app holds the whole service: the FastAPI API as an ingress deployment (any
number of replicas; the database is the only shared state), the Generator deployment it
answers from, and (started by each API replica, idempotently by name) the dispatcher actor
and the in-service scheduler, whose DB lease keeps a single leader across replicas.
Configuration comes from `OBLIVIO_*` environment variables (ConfigMap + Secret).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from service.app import create_app
from service.settings import get_settings
from workers.runtime import serving_config
from workers.serving import Generator

settings = get_settings()
api = create_app(settings)


@serve.deployment(name="OblivioAPI", num_replicas=1, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(api)
class OblivioAPI:
    def __init__(self, generator: Any) -> None:
        from service.scheduler import SchedulerLoop
        from workers.dispatcher import start_dispatcher_actor

        api.state.generator = generator  # /v1/generate and /v1/chat/completions use it
        self._dispatcher = start_dispatcher_actor(settings)  # get_if_exists: one per cluster
        self._scheduler = (SchedulerLoop(settings, api.state.sessions).start()
                           if settings.scheduler_enabled else None)

    def __del__(self) -> None:
        if self._scheduler is not None:
            self._scheduler.stop()


app = OblivioAPI.bind(Generator.bind(serving_config(settings)))

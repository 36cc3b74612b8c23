"""The whole service as one Ray Serve application (what a KubeRay RayService runs).

`build_ingress_app` wraps the web layer's FastAPI app (handed in, so this module never
imports the web layer) as an ingress deployment bound to the Generator deployment. Each
API replica starts the dispatcher actor (by name: one per cluster) and, if given, the
scheduler (whose DB lease keeps one leader among replicas).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from workers.config import WorkerConfig


def build_ingress_app(api: Any, config: WorkerConfig, *,
                      start_scheduler: Callable[[], Any] | None = None) -> Any:
    from ray import serve

    from workers.runtime import serving_config
    from workers.serving import generator_app

    @serve.deployment(name="OblivioAPI", num_replicas=1, ray_actor_options={"num_cpus": 0.5})
    @serve.ingress(api)
    class OblivioAPI:
        def __init__(self, generator: Any) -> None:
            from workers.dispatcher import start_dispatcher_actor

            api.state.generator = generator  # /v1/generate and /v1/chat/completions use it
            self._dispatcher = start_dispatcher_actor(config)
            self._scheduler = start_scheduler() if start_scheduler is not None else None

        def __del__(self) -> None:
            if self._scheduler is not None:
                self._scheduler.stop()

    return OblivioAPI.bind(generator_app(serving_config(config)))

"""The Ray side of `oblivio serve`: a local (or joined) cluster, the dispatcher, generation.

The API process is the Ray driver. It owns a `Runtime`, whose `stop()` shuts down what it
started (and leaves a cluster it merely joined running).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.config import WorkerConfig
from workers.priority import NICE_ENV

log = logging.getLogger(__name__)


# Ray Train's controller checks its workers every 2 s by default, so each state change
# (workers up, training done) waits up to 2 s; its preemption watcher is one more actor
# process per run, for spot nodes being drained. A job here is short and mostly start-up:
# poll often, and leave the watcher to clusters that set it on explicitly.
RAY_TRAIN_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


def ray_env(config: WorkerConfig) -> dict[str, str]:
    """Environment every Ray worker needs: no hub access, a cached DeepSpeed op dir, and
    Ray Train settings for short jobs (an operator's own values win)."""
    # Absolute: Ray workers run in other working directories.
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR")
                 or config.data_dir / "torch_extensions").expanduser().resolve()
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": str(cache),
        "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
        # Read by training ranks only (workers.priority.yield_cpu_from_env), not by Serve.
        NICE_ENV: str(config.background_nice),
        **{k: os.environ.get(k, v) for k, v in RAY_TRAIN_ENV_DEFAULTS.items()},
    }


def connect_ray(config: WorkerConfig, *, num_cpus: int | None = None,
                include_dashboard: bool = True) -> bool:
    """Connect to `config.ray_address` or start a local cluster; True if we started it."""
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": ray_env(config)}
    if config.ray_address:
        ray.init(address=config.ray_address, runtime_env=env, log_to_driver=False)
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=include_dashboard,
             dashboard_host="127.0.0.1", runtime_env=env, log_to_driver=False)
    return True


def dashboard_url() -> str | None:
    import ray

    if not ray.is_initialized():
        return None
    url = ray.get_runtime_context().worker.node.address_info.get("webui_url")
    return f"http://{url}" if url and not url.startswith("http") else url


@dataclass
class Runtime:
    """What `oblivio serve` started beside the API."""

    config: WorkerConfig
    started_ray: bool
    generator: Any = None  # Ray Serve handle for workers.serving.Generator
    dispatcher: Any = None  # DispatcherActor handle
    info: dict[str, Any] = field(default_factory=dict)

    def dispatcher_status(self) -> dict[str, Any] | None:
        import ray

        if self.dispatcher is None:
            return None
        try:
            return ray.get(self.dispatcher.status.remote(), timeout=5)
        except Exception as exc:  # the actor restarts on failure; say so rather than hang
            return {"alive": False, "error": f"{type(exc).__name__}: {exc}"}

    def stop(self) -> None:
        import ray
        from ray import serve

        if self.dispatcher is not None:
            try:
                ray.get(self.dispatcher.stop.remote(), timeout=10)
                ray.kill(self.dispatcher)
            except Exception:  # already gone
                log.debug("dispatcher already stopped", exc_info=True)
        if self.generator is not None:
            try:
                serve.shutdown()
            except Exception:
                log.debug("serve already stopped", exc_info=True)
        if self.started_ray:
            ray.shutdown()


def start_runtime(config: WorkerConfig, *, dispatcher: bool = True, serving: bool = True,
                  num_cpus: int | None = None) -> Runtime:
    """Start Ray, the generation deployment and the dispatcher actor."""
    from workers.dispatcher import start_dispatcher_actor
    from workers.serving import deploy

    started = connect_ray(config, num_cpus=num_cpus)
    runtime = Runtime(config=config, started_ray=started)
    runtime.info["ray_dashboard"] = dashboard_url()
    if serving:
        runtime.generator = deploy(serving_config(config))
    if dispatcher:
        runtime.dispatcher = start_dispatcher_actor(config)
    return runtime


def serving_config(config: WorkerConfig) -> Any:
    from workers.serving import ServingConfig

    return ServingConfig(base_model=config.base_model, data_dir=str(config.data_dir),
                         store=config.store, device=config.device,
                         resources=dict(config.worker_resources))

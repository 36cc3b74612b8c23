"""A job's evaluation as a Ray task: the `Evaluator` actor, not the dispatcher, scores a version.

Evaluation is most of a job's compute after training (a few hundred greedy generations on
the base model and the new version). Run inside the dispatcher it would compete with
claiming and leasing, and it could only use the dispatcher's node. The evaluator is a Ray
actor (so its loaded base models stay warm between jobs, as the dispatcher's did) that asks
for the configured worker resources, so that it runs where training runs. It shares no
directory with the dispatcher: the version (and its parent) travel as bytes
(workers/shipping.py), the base model is resolved on its own node, stored checkpoints come
from the object store, and what the evaluation writes into the version (its report) comes
back as bytes.

With trainer "plain" (tests, debugging: everything in one process) the job runner evaluates
in its own process instead (`workers.job_compute.evaluate_version`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

from workers.config import WorkerConfig
from workers.engines.base import JobInput

log = logging.getLogger(__name__)

_EVALUATORS: dict[tuple[str, str], Any] = {}  # per dispatcher process: (Ray job, config)
_EVALUATORS_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """What an evaluation task returns: the metrics, the files it wrote into the version
    (relative path -> bytes), and the Ray node it ran on."""

    metrics: dict[str, Any]
    written: dict[str, bytes]
    node_id: str


def evaluate_on_ray(engine_name: str, job: JobInput, *, version_dir: Path) -> Evaluated:
    """Evaluate `version_dir` (the job's new version) on this dispatcher's evaluator; the
    files the evaluation writes are written into `version_dir` here too."""
    import ray

    from workers.shipping import read_files, write_files

    portable = dataclasses.replace(job, fetch=None, store_dir=None, sessions=None)
    parent = read_files(job.parent_dir) if job.parent_dir is not None else None
    done: Evaluated = ray.get(evaluator(job.config).evaluate.remote(
        engine_name, portable, read_files(version_dir), parent))
    write_files(done.written, version_dir)
    return done


def warm_evaluator(config: WorkerConfig, engine_name: str) -> None:
    """Start the evaluator and load `engine_name`'s evaluation model there now."""
    import ray

    ray.get(evaluator(config).warm.remote(engine_name))


def evaluator(config: WorkerConfig) -> Any:
    """This process's evaluator actor for `config`, started on first use.

    The actor holds its config (base model, store, database), so a different config gets a
    different actor; one that replaces it stops the old one, so that a process that moves
    between configs (tests) does not keep every old evaluator's models in memory."""
    import ray

    key = (ray.get_runtime_context().get_job_id(), _fingerprint(config))
    with _EVALUATORS_LOCK:
        if key not in _EVALUATORS:
            for stale in list(_EVALUATORS):
                if stale[0] == key[0]:
                    _kill(_EVALUATORS.pop(stale))
            # max_restarts: a crashed evaluator fails only the job it was scoring (which is
            # retried through the queue); the next job gets a fresh one.
            _EVALUATORS[key] = _evaluator_cls().options(
                num_cpus=0, resources=dict(config.worker_resources), max_restarts=-1,
                max_task_retries=0).remote(config)
        return _EVALUATORS[key]


def _fingerprint(config: WorkerConfig) -> str:
    import hashlib

    # repr leaves out the payload key (never printed); a digest of it still tells configs apart.
    key_digest = hashlib.sha256((config.payload_key or "").encode()).hexdigest()[:16]
    return f"{config!r}|{key_digest}"


def _kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor)
    except Exception:  # already gone
        log.debug("evaluator already gone", exc_info=True)


def shutdown_evaluators() -> None:
    """Kill this process's evaluators (the dispatcher stopping; tests)."""
    with _EVALUATORS_LOCK:
        actors = list(_EVALUATORS.values())
        _EVALUATORS.clear()
    for actor in actors:
        _kill(actor)


def _evaluator_cls() -> Any:
    import ray

    @ray.remote
    class Evaluator:
        """Scores versions with `workers.job_compute.evaluate_version`, on its own node."""

        def __init__(self, config: WorkerConfig) -> None:
            from workers.logcontext import configure_logging
            from workers.priority import yield_cpu

            configure_logging(config.log_format, config.log_level)
            yield_cpu(config.background_nice)  # background work, like the training ranks
            self._config = config
            self._store = config.store.open()
            self._sessions: Any = None
            if config.database_url:
                from storage.db import make_engine, make_session_factory

                self._sessions = make_session_factory(make_engine(config.database_url))

        def warm(self, engine_name: str) -> None:
            from workers import job_compute

            job_compute.warm_evaluation(self._config, engine_name)

        def evaluate(self, engine_name: str, job: JobInput, version: dict[str, bytes],
                     parent: dict[str, bytes] | None) -> Evaluated:
            import ray

            from workers import job_compute
            from workers.engines import get_engine
            from workers.logcontext import bind_log_context, unbind_log_context
            from workers.shipping import changed_files, write_files

            token = bind_log_context(job_id=job.job_id)
            scratch = Path(tempfile.mkdtemp(prefix="oblivio-eval-"))
            try:
                base = job_compute.resolve_base(self._config)
                if base.sha256 != job.base_model_sha256:
                    raise RuntimeError(
                        f"the evaluator's base model {base.sha256[:12]} is not the job's "
                        f"{job.base_model_sha256[:12]}")
                version_dir = write_files(version, scratch / "version")
                parent_dir = write_files(parent, scratch / "parent") if parent else None

                def fetch(key: str) -> Path:
                    return self._store.fetch_directory(key, scratch / "fetched"
                                                       / uuid.uuid4().hex)

                local = dataclasses.replace(
                    job, base_model_path=Path(base.local_path), parent_dir=parent_dir,
                    output_dir=version_dir, fetch=fetch, sessions=self._sessions)
                metrics = job_compute.evaluate_version(get_engine(engine_name), local,
                                                       base=base, version_dir=version_dir,
                                                       fetch=fetch)
                return Evaluated(metrics=metrics, written=changed_files(version_dir, version),
                                 node_id=ray.get_runtime_context().get_node_id())
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
                unbind_log_context(token)

    return Evaluator

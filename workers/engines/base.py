"""The one shape every way of forgetting has: validate at submission, train, serve.

The job runner (workers.job_runner), the ticket API (validation at submission), the
dispatcher (which engines are runnable), the receipt and the Ray Serve deployment
(workers.serving) call only what is declared here, never anything engine-specific. A new
engine is a folder under workers/engines/ with its config, its algorithm and one
`register_engine(...)` line; the parametrised engine test runs it on a tiny model.

Nothing here imports torch, ray or deepspeed: the API validates tickets with `validate`
and must stay light. Engines import heavy modules inside their methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from workers.config import WorkerConfig

__all__ = ["MANIFEST_FILE", "Artifacts", "Engine", "EngineRequest", "JobInput", "ProgressFn",
           "Servable", "WorkerConfig", "request_from_payload"]

MANIFEST_FILE = "oblivio_manifest.json"
"""Written by the job runner into every version's directory; its "engine" field names the
engine whose `load_servable` serves the version."""

ProgressFn = Callable[[dict[str, Any]], None]
"""Called with partial progress, e.g. {"phase": "training", "step": 3, "max_steps": 40}."""

FetchFn = Callable[[str], Path]
"""Object key -> local directory holding that stored (verified) directory."""


@dataclass(frozen=True)
class EngineRequest:
    """What a ticket asks for, as `Engine.validate` sees it at submission time.

    Args:
        kind: "forget", "delete_records", "finetune" (S3T: train a lineage on a
            registered dataset; also its background retrain after deletions) or "revoke"
            (an operator withdraws a done ticket's forgetting, for engines that have
            `without_request`).
        engine: the engine's registry name.
        target: who or what is forgotten (forget tickets), or None.
        forget_qa: [{"question", "answer"}] to forget; forget_texts: passages to forget.
        retain_qa, retain_texts: optional retain data from the ticket.
        record_ids, subject_id: which records to delete (delete_records tickets).
        options: engine/method options given by the ticket (may be empty); for finetune
            the S3T plan (shards, slices, sequences_per_shard, ...).
        dataset: the registered dataset (delete_records, finetune), or None.
        revokes: the id of the ticket whose contribution a revoke ticket removes.
    """

    kind: str
    engine: str
    target: str | None = None
    forget_qa: list[dict[str, str]] = field(default_factory=list)
    forget_texts: list[str] = field(default_factory=list)
    retain_qa: list[dict[str, str]] = field(default_factory=list)
    retain_texts: list[str] = field(default_factory=list)
    record_ids: list[str] = field(default_factory=list)
    subject_id: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None
    revokes: str | None = None


def request_from_payload(*, kind: str, engine: str, payload: dict[str, Any] | None,
                         target: str | None = None) -> EngineRequest:
    """The EngineRequest of a ticket payload (storage/tickets.py documents its shapes).

    One function for both sides, so the API validates exactly what the job will train on.
    """
    payload = payload or {}
    forget = payload.get("forget") or {}
    retain = payload.get("retain") or {}

    def qa(items: dict[str, Any]) -> list[dict[str, str]]:
        return [{"question": i["question"], "answer": i["answer"]} for i in items.get("qa") or []]

    return EngineRequest(
        kind=str(getattr(kind, "value", kind)), engine=engine,
        target=target if target is not None else payload.get("target"),
        forget_qa=qa(forget), forget_texts=list(forget.get("texts") or []),
        retain_qa=qa(retain), retain_texts=list(retain.get("texts") or []),
        record_ids=list(payload.get("record_ids") or []), subject_id=payload.get("subject_id"),
        options=dict(payload.get("options") or {}), dataset=payload.get("dataset"),
        revokes=payload.get("revokes"))


@dataclass(frozen=True)
class JobInput:
    """Everything `Engine.train` gets for one job.

    Args:
        job_id: the job's id (str).
        lineage: the lineage's name.
        requests: one EngineRequest per ticket of the job, in claim order.
        ticket_ids: the tickets' ids (str), same order.
        base_model_path, base_model_sha256: the resolved base model.
        parent_dir: the parent version's stored directory (fetched, verified), or None.
        output_dir: where the engine writes the new version's directory.
        config: the worker configuration.
        fetch: fetches another stored directory by object key (S3T checkpoints).
        store_dir: stores a directory content-addressed, returns its object key (S3T
            checkpoints); None when the job runner offers no side storage.
        sessions: a SQLAlchemy sessionmaker, for engines that keep state in their own
            tables (S3T: records and checkpoints); None when the runner gives none.
    """

    job_id: str
    lineage: str
    requests: list[EngineRequest]
    ticket_ids: list[str]
    base_model_path: Path
    base_model_sha256: str
    parent_dir: Path | None
    output_dir: Path
    config: WorkerConfig
    fetch: FetchFn | None = None
    store_dir: Callable[[Path], str] | None = None
    sessions: Any = None


@dataclass(frozen=True)
class Artifacts:
    """What a job produced: one directory that becomes the new immutable version.

    Args:
        version_dir: the directory to store (content addressed) as the version.
        metrics: training metrics (steps, losses, timings, ...), stored with the version.
        method_config: how it was made (recipe, options), recorded in manifest and receipt.
        peft_config: the adapter_config.json contents, when the version is a PEFT adapter.
        receipt: engine-specific fields added to every ticket's receipt (S3T: deleted record
            ids and the exactness evidence).
        follow_up: tickets the job runner queues once this version is published, each
            {"kind", "engine", "payload"} (S3T: the background retrain after a deletion).
        withdrawn: ids of tickets whose contribution this version removed (revoke
            tickets); while it is in the live chain they are not done (ticket_states).
    """

    version_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    method_config: dict[str, Any] = field(default_factory=dict)
    peft_config: dict[str, Any] | None = None
    receipt: dict[str, Any] = field(default_factory=dict)
    follow_up: list[dict[str, Any]] = field(default_factory=list)
    withdrawn: list[str] = field(default_factory=list)


class Servable(Protocol):
    """A loaded version that answers prompts (serving and the job's own evaluation).

    Optional: `close()` frees what loading took (e.g. a PEFT adapter's weights); serving
    calls it when the version is evicted from its cache. Servables without it lack it.
    """

    def generate(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]:
        """Greedy answers, one per prompt (chat-formatted by the servable), in order.

        Optionally also `stop: list[StopFn | None]` (workers/evaluation/generation.py): a
        servable that takes it may end row i once `stop[i](answer so far)` is True; the
        evaluation passes it for probes judged only by correctness, to stop generating
        once the verdict on an answer cannot change.

        Optionally also `on_token: TokenFn` (workers/model/token_stream.py): called with
        (row, token id) for each token of each answer as it is decoded; serving streams
        with it. A servable without it streams its whole answer at the end.
        """
        ...


class Engine(Protocol):
    """An unlearning engine (see module docstring)."""

    name: ClassVar[str]
    ticket_kinds: ClassVar[frozenset[str]]
    # Optional: `runnable = False` registers an engine whose tickets are accepted but stay
    # queued (no worker trains it yet); absent means True.

    def validate(self, request: EngineRequest) -> None:
        """Refuse (storage.errors.InvalidRequest, a 422) what this engine cannot do."""
        ...

    def train(self, job: JobInput, progress: ProgressFn) -> Artifacts:
        """Produce the new version's directory for `job` (on Ray Train + DeepSpeed)."""
        ...

    def load_servable(self, version_dir: Path | None, *, model: Any, tokenizer: Any,
                      device: str, fetch: FetchFn | None = None) -> Servable:
        """Wrap the loaded base `model` so that it answers as `version_dir` does.

        `version_dir` None means the base model itself. A serving replica hands every
        engine of one class the same `model` (another class gets its own copy), and loads
        several versions on it at once: the engine may wrap or inject into it, as long as
        each servable answers as its own version (and None as the base).
        """
        ...

    def evaluate(self, job: JobInput, *, before: Servable, after: Servable) -> dict[str, Any]:
        """The new version's own evaluation, stored with it.

        `before` answers as the base model, `after` as the new version (which carries
        every earlier request of the lineage too, so the verdict judges their sum).
        Returns metrics including "verdict": "pass" (may go live), "hold" (candidate for
        an operator) or "reject" (not kept). Forgetting engines share one implementation
        (workers.evaluation.version_eval.evaluate_forgetting); S3T judges its own way.
        An engine may also take `parent: Servable | None` (the lineage's previous
        version): the job runner passes it when the signature has it, so the report
        compares with the parent as well as the base.
        """
        ...

    # Optional (engines that can drop one request's contribution without training, e.g.
    # O3's separable blocks): write a version equal to `version_dir` without the part
    # that came from `ticket_id` into `output_dir`. Engines without it lack the attribute.
    # def without_request(self, version_dir: Path, *, ticket_id: str, output_dir: Path
    #                     ) -> Artifacts: ...

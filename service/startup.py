"""What must be true before the API serves: schema migrated, default lineage, first admin."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from storage import migrate, registry, sealing, tokens
from storage.db import transaction
from storage.models import Lineage

log = logging.getLogger(__name__)

DEFAULT_LINEAGE = "default"


@dataclass(frozen=True)
class StartupReport:
    """admin_token_file: where the first admin token was written (this start), else None."""

    admin_token_file: Path | None


def is_embedded(settings: Settings) -> bool:
    """The embedded default: a SQLite database (no operator set up a real one)."""
    return settings.resolved_database_url.startswith("sqlite")


def prepare(settings: Settings, sessions: sessionmaker[Session]) -> StartupReport:
    """Idempotent: migrate, make sure `default` exists, and on the embedded default create
    the first admin token (written to `<data_dir>/admin-token`, never logged)."""
    migrate.upgrade(settings.resolved_database_url)
    # Before any worker starts: the key every process of this deployment must share.
    sealing.load_or_create_key(settings.payload_key_text, settings.payload_key_file)
    admin_file = None
    with transaction(sessions) as session:
        _ensure_default_lineage(session, settings)
        if is_embedded(settings):
            admin_file = tokens.ensure_bootstrap_admin(session, settings.data_dir)
    if admin_file is not None:
        log.info("admin token written to %s", admin_file)
    return StartupReport(admin_token_file=admin_file)


def _ensure_default_lineage(session: Session, settings: Settings) -> None:
    existing = session.scalar(select(Lineage).where(Lineage.name == DEFAULT_LINEAGE))
    if existing is None:
        # The base model's hash is pinned by the first job that loads it.
        registry.ensure_lineage(session, name=DEFAULT_LINEAGE, base_model=settings.base_model)
    elif existing.base_model != settings.base_model:
        # Not fatal here: the API still serves tickets and history. Jobs refuse to mix base
        # models (they compare content hashes), which is where it matters.
        log.warning("lineage %r is on base model %r but OBLIVIO_BASE_MODEL is %r",
                    DEFAULT_LINEAGE, existing.base_model, settings.base_model)


def admin_token_path(settings: Settings) -> Path:
    return settings.data_dir / tokens.ADMIN_TOKEN_FILE

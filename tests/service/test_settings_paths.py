"""Every path the service hands to other processes (Ray workers, Ray Train, Serve replicas)
is absolute, however relative the settings (issue 8: `.oblivio/jobs/...` reached Ray Train)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings


def test_relative_settings_become_absolute_worker_config(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OBLIVIO_DATA_DIR", ".oblivio")
    monkeypatch.setenv("OBLIVIO_DATABASE_URL", "sqlite:///state/oblivio.db")
    settings = Settings()
    config = settings.worker_config()
    assert config.data_dir == tmp_path / ".oblivio"
    assert config.database_url == f"sqlite:///{tmp_path / 'state' / 'oblivio.db'}"
    assert config.store.url == f"file://{tmp_path / '.oblivio' / 'objects'}"
    monkeypatch.delenv("OBLIVIO_DATABASE_URL")
    assert Settings().worker_config().database_url == (
        f"sqlite:///{tmp_path / '.oblivio' / 'oblivio.db'}")
    # Other databases are left as they are.
    monkeypatch.setenv("OBLIVIO_DATABASE_URL", "postgresql+psycopg://u:pw@db/oblivio")
    assert Settings().worker_config().database_url == "postgresql+psycopg://u:pw@db/oblivio"


def test_a_relative_model_path_and_extension_dir_reach_ray_absolute(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.config import WorkerConfig
    from workers.runtime import ray_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", ".cache/torch_extensions")
    env = ray_env(WorkerConfig(data_dir=tmp_path / "d"))
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / ".cache" / "torch_extensions")
    with pytest.raises(ValueError, match="absolute"):
        WorkerConfig(data_dir=Path("relative"))

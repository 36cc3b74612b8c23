"""Fixtures for the training-side tests.

The session fixtures `bundled_model`, `tiny_model_dir` and `ray_cluster` come from
tests/fixtures/workers.py (registered in tests/conftest.py, so every test folder shares them
and one Ray cluster serves the whole session); plain helpers are in tests/fixtures/training.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.training import FORGET_QA, SMALL_RECIPE


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture
def make_spec(tiny_model_dir: Path, tmp_path: Path) -> Callable[..., Any]:
    """`make_spec(method, out=..., recipe={...}, **spec_fields)`: a small job on the tiny model."""
    from workers.model.base_model import _weights_sha256
    from workers.training.spec import TrainJobSpec

    sha = _weights_sha256(tiny_model_dir)

    def make(method: str = "npo", *, out: str = "adapter", recipe: dict[str, Any] | None = None,
             **kwargs: Any) -> TrainJobSpec:
        kwargs.setdefault("forget_qa", FORGET_QA)
        kwargs.setdefault("target", "Zorblat")
        return TrainJobSpec.for_engine(method, overrides={**SMALL_RECIPE, **(recipe or {})},
                                       base_model_path=str(tiny_model_dir),
                                       base_model_sha256=sha, output_dir=str(tmp_path / out),
                                       data_dir=str(tmp_path / "data"), **kwargs)

    return make

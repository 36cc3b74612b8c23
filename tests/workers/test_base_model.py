"""Base model resolution: the bundled model is converted once and then found by hash;
nothing is ever downloaded."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from workers.model import format_chat, load_model_and_tokenizer, resolve_base_model

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / ".cache" / "oblivio-data"


def _independent_sha256(path: Path) -> str:
    """The documented hash, recomputed here: sha256 over each weight file's name + bytes,
    in name order (so a hash of anything else, or a cached stale one, is caught)."""
    import hashlib

    digest = hashlib.sha256()
    for p in sorted(q for q in path.iterdir() if q.suffix in (".safetensors", ".bin")):
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


def test_resolve_is_cached_and_stable(bundled_model) -> None:
    started = time.perf_counter()
    again = resolve_base_model("bundled:smollm2-135m-instruct", DATA)
    assert time.perf_counter() - started < 2.0  # converted once, then only looked up
    assert again == bundled_model
    assert again.name == "bundled:smollm2-135m-instruct"
    assert again.sha256 == _independent_sha256(again.local_path)
    names = {p.name for p in again.local_path.iterdir()}
    assert any(n.endswith(".safetensors") for n in names)
    assert {"config.json", "tokenizer_config.json"} <= names
    assert "tokenizer.json" in names or "vocab.json" in names
    # A local directory resolves to itself, with the same hash.
    by_path = resolve_base_model(str(again.local_path), DATA)
    assert by_path.local_path == again.local_path and by_path.sha256 == again.sha256


def test_hash_follows_the_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    from workers.model.tiny import build_tiny_llama

    tiny = resolve_base_model(str(tiny_model_dir), tmp_path)
    assert tiny.sha256 == resolve_base_model(str(tiny_model_dir), tmp_path).sha256
    assert tiny.sha256 == _independent_sha256(tiny_model_dir)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    assert resolve_base_model(str(copy), tmp_path).sha256 == tiny.sha256  # content, not path
    other = build_tiny_llama(tmp_path / "other", tokenizer_from=tiny_model_dir, seed=1)
    assert resolve_base_model(str(other), tmp_path).sha256 != tiny.sha256


def test_chat_format_wraps_the_user_text(bundled_model) -> None:
    model, tokenizer = load_model_and_tokenizer(bundled_model)
    assert not model.training
    prompt = format_chat(tokenizer, "Where does Zorblat live?")
    assert "Where does Zorblat live?" in prompt
    # SmolLM2's ChatML template: a user turn, then the opened assistant turn to continue.
    assert "<|im_start|>user" in prompt
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert prompt.index("<|im_start|>user") < prompt.index("Where does Zorblat live?")


def test_a_model_that_is_not_local_is_refused_never_downloaded(tmp_path: Path) -> None:
    for spec in ("/nonexistent/dir-or-id", "nobody-oblivio/not-a-cached-model"):
        with pytest.raises(ValueError, match="never downloads models"):
            resolve_base_model(spec, tmp_path)
    with pytest.raises(ValueError, match="unknown bundled model"):
        resolve_base_model("bundled:gpt-17", tmp_path)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    with pytest.raises(ValueError, match="no weight files"):
        resolve_base_model(str(empty), tmp_path)


def test_a_relative_model_path_is_resolved_absolute(tiny_model_dir: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    # It travels to Ray Train workers, which run in another working directory.
    monkeypatch.chdir(tiny_model_dir.parent)
    ref = resolve_base_model(tiny_model_dir.name, tmp_path)
    assert ref.local_path.is_absolute() and ref.local_path == tiny_model_dir.resolve()

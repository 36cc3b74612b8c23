"""Revoking one request removes exactly its block and its detector, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def version(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.fixtures.training import load_tiny
    from tests.workers.engines.o3_version import build_version

    model, tokenizer = load_tiny(tiny_model_dir)
    return model, tokenizer, build_version(model, tokenizer,
                                           tmp_path_factory.mktemp("o3r") / "version")


def test_without_request_drops_one_block_and_its_detector(version, tmp_path: Path) -> None:
    from workers.engines import get_engine
    from workers.engines.o3.engine import read_blocks
    from workers.training.lora_stack import read_adapter, stack_ranks

    model, tokenizer, v = version
    engine = get_engine("o3")
    artifacts = engine.without_request(v, ticket_id="t-a", output_dir=tmp_path / "v3")
    out = artifacts.version_dir
    assert [b.ticket_id for b in read_blocks(out)] == ["t-b"]
    assert stack_ranks(out) == [4]
    assert sorted(p.name for p in (out / "detectors").iterdir()) == ["1-t-b"]
    assert (out / "detectors/1-t-b/detector.safetensors").read_bytes() == \
        (v / "detectors/1-t-b/detector.safetensors").read_bytes()
    before_cfg, before = read_adapter(v)
    after_cfg, after = read_adapter(out)
    assert after_cfg["r"] == 4 and after_cfg["lora_alpha"] == 4
    scale = before_cfg["lora_alpha"] / before_cfg["r"]
    for key, w in after.items():
        if ".lora_A." in key:
            assert torch.equal(w, before[key][4:8])          # block b's rows, unchanged
        else:
            assert torch.allclose(w, before[key][:, 4:8] * scale)
    # The remaining block acts exactly as block b alone did.
    _, b_alone = read_adapter(v.parent / "block-b")
    cfg_b = json.loads((v.parent / "block-b/adapter_config.json").read_text())
    for key, w in after.items():
        alone = b_alone[key]
        if ".lora_B." in key:
            alone = alone * cfg_b["lora_alpha"] / cfg_b["r"]
        assert torch.allclose(w, alone, atol=1e-6), key


def test_revoking_the_last_block_leaves_the_base_model(version, tmp_path: Path) -> None:
    from workers.engines import get_engine
    from workers.engines.o3.engine import read_blocks
    from workers.engines.o3.serving import O3Servable
    from workers.evaluation.generation import greedy_answers

    model, tokenizer, v = version
    engine = get_engine("o3")
    one = engine.without_request(v, ticket_id="t-a", output_dir=tmp_path / "one").version_dir
    none = engine.without_request(one, ticket_id="t-b", output_dir=tmp_path / "none").version_dir
    assert read_blocks(none) == [] and not (none / "adapter_model.safetensors").exists()
    servable = O3Servable.load(none, model=model, tokenizer=tokenizer, device="cpu")
    prompts = ["Where does Zorblat live?"]
    assert servable.generate(prompts, [8]) == greedy_answers(model, tokenizer, prompts,
                                                             max_new_tokens=8)
    with pytest.raises(ValueError, match="no block"):
        engine.without_request(v, ticket_id="nope", output_dir=tmp_path / "x")

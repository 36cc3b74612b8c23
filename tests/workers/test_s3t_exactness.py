"""S3T's core promise on a tiny model: after deletions, no served layer group was trained on
a deleted record (from the database), and what is served equals a model assembled from the
surviving checkpoints alone; retraining reuses every prefix before the cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage import datasets
from storage.db import transaction
from storage.models import S3TCheckpoint
from storage.objectstore.local import LocalObjectStore
from tests.fixtures.people import people_records
from tests.fixtures.s3t import S3THarness, delete_request, finetune_request
from tests.fixtures.training import load_tiny
from workers.engines.s3t import plan as plans

OPTIONS = {"shards": 2, "slices": 2, "sequences_per_shard": 2, "epochs": 2, "batch_size": 4,
           "lr": 1e-2, "eval_records": 0}
PROMPTS = ["Where does Tavi Vondrak live?", "What is Orrin Stroud's job?", "Hello there"]


@pytest.fixture
def harness(db: Any, tmp_path: Path, tiny_model_dir: Path) -> S3THarness:
    with transaction(db.sessions) as s:
        datasets.add_records(s, name="people", records=people_records(6), actor="test")
    return S3THarness(sessions=db.sessions, store=LocalObjectStore(tmp_path / "objects"),
                      base_model_path=tiny_model_dir, work=tmp_path / "work")


def _checkpoint_rows(h: S3THarness, hashes: list[str]) -> dict[str, S3TCheckpoint]:
    from sqlalchemy import select

    with transaction(h.sessions) as s:
        rows = list(s.scalars(select(S3TCheckpoint).where(S3TCheckpoint.prefix_hash.in_(hashes))))
        s.expunge_all()
    return {r.prefix_hash: r for r in rows}


def _assembled_logits(h: S3THarness, manifest: dict[str, Any], deleted: set[str]) -> Any:
    """The reference: for each shard, cut each sequence at its first checkpoint whose DB
    training records include a deleted id, keep the longest, load those checkpoints with
    plain PEFT on a fresh base model, and average the shards' logits."""
    import torch
    from peft import get_peft_model, set_peft_model_state_dict

    from workers.engines.s3t.config import S3TConfig
    from workers.engines.s3t.training import lora_config, read_group
    from workers.model import format_chat

    cfg = S3TConfig.from_options({k: v for k, v in manifest["config"].items()})
    all_hashes = [p["prefix_hash"] for sh in manifest["shards"] for q in sh["sequences"]
                  for p in q["prefixes"]]
    rows = _checkpoint_rows(h, all_hashes)
    per_shard = []
    for shard in manifest["shards"]:
        best: list[S3TCheckpoint] = []
        for seq in shard["sequences"]:
            alive = []
            for p in seq["prefixes"]:
                row = rows[p["prefix_hash"]]
                if deleted.intersection(row.record_ids):
                    break
                alive.append(row)
            if len(alive) > len(best):
                best = alive
        if best:
            per_shard.append(best)
    model, tok = load_tiny(h.base_model_path)
    tok.padding_side = "left"
    enc = tok([format_chat(tok, p) for p in PROMPTS], return_tensors="pt", padding=True,
              add_special_tokens=False)
    positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    outs = []
    for groups in per_shard:
        base, _ = load_tiny(h.base_model_path)
        weights: dict[str, Any] = {}
        for row in groups:
            weights.update(read_group(h.fetch(row.object_key)))
        layers = sorted({layer for row in groups for layer in row.layers})
        peft_model = get_peft_model(base, lora_config(cfg, layers))
        set_peft_model_state_dict(peft_model, weights)
        peft_model.eval()
        with torch.no_grad():
            outs.append(peft_model(input_ids=enc["input_ids"],
                                   attention_mask=enc["attention_mask"],
                                   position_ids=positions).logits[:, -1].float())
    if not outs:
        with torch.no_grad():
            return model(**enc, position_ids=positions).logits[:, -1].float()
    if manifest["config"]["aggregate"] == "logits":
        return torch.stack(outs).mean(0)
    mean_p = sum(torch.softmax(o, -1) for o in outs) / len(outs)
    return mean_p.log()


def _served_logits(h: S3THarness, version_dir: Path) -> Any:
    from workers.engines.registry import get_engine

    model, tok = load_tiny(h.base_model_path)
    servable = get_engine("s3t").load_servable(version_dir, model=model, tokenizer=tok,
                                               device="cpu", fetch=h.fetch)
    return servable, servable.next_token_logits(PROMPTS)


def _active_ids_from_db(h: S3THarness, manifest: dict[str, Any]) -> set[str]:
    served = [g["prefix_hash"] for g in plans.active_groups(manifest)]
    rows = _checkpoint_rows(h, served)
    assert set(rows) == set(served), "every served group has its checkpoint row"
    return {i for r in rows.values() for i in r.record_ids}


def test_deletions_are_exact_and_retraining_reuses_prefixes(harness: S3THarness) -> None:
    import torch

    h = harness
    progress: list[dict[str, Any]] = []
    v1 = h.run([finetune_request("people", **OPTIONS)], None, progress)
    m1 = plans.read_manifest(v1.version_dir)
    # 2 shards x 2 sequences x 2 prefixes, all distinct (different first slices)
    assert v1.metrics["prefixes_trained"] == 8 and v1.metrics["prefixes_reused"] == 0
    assert progress[-1]["step"] == progress[-1]["max_steps"] > 0
    assert all(q["active"] == 2 for sh in m1["shards"] for q in sh["sequences"])
    _, before = _served_logits(h, v1.version_dir)
    assert torch.allclose(before, _assembled_logits(h, m1, set()), atol=1e-5)

    # Delete one subject: no training, every served group from the DB excludes its records.
    v2 = h.run([delete_request("people", subject_id="person-1")], v1.version_dir)
    m2 = plans.read_manifest(v2.version_dir)
    gone = {"person-1-town", "person-1-job"}
    assert v2.receipt["deleted_record_ids"] == sorted(gone)
    assert v2.receipt["exactness"]["exact"] is True
    assert all(g["hash_matches_records"] and not g["deleted_ids_trained_on"]
               for g in v2.receipt["exactness"]["served_groups"])
    assert v2.receipt["cut_sequences"], "the subject's shard was cut"
    assert not gone & _active_ids_from_db(h, m2)
    with transaction(h.sessions) as s:
        rows = [r for r in datasets.all_records(s, datasets.get_dataset(s, "people"))
                if r.record_id in gone]
        assert all(r.content is None and r.deleted_at is not None for r in rows)
    servable, served = _served_logits(h, v2.version_dir)
    assert torch.allclose(served, _assembled_logits(h, m2, gone), atol=1e-5)
    assert not torch.allclose(served, before, atol=1e-3), "the deletion changed the model"
    assert len(servable.generate(PROMPTS[:2], [4, 4])) == 2
    assert v2.follow_up and v2.follow_up[0]["kind"] == "finetune"

    # The background retrain: only prefixes from the deleted slice on are trained again.
    follow = v2.follow_up[0]["payload"]
    v3 = h.run([finetune_request("people", **follow["options"])], v2.version_dir)
    m3 = plans.read_manifest(v3.version_dir)
    assert 0 < v3.metrics["prefixes_trained"] < 8
    assert v3.metrics["prefixes_reused"] >= 8 - v3.metrics["prefixes_trained"]
    assert not gone & _active_ids_from_db(h, m3)
    assert all(q["active"] == 2 for sh in m3["shards"] for q in sh["sequences"])
    _, served3 = _served_logits(h, v3.version_dir)
    assert torch.allclose(served3, _assembled_logits(h, m3, gone), atol=1e-5)

    # A second deletion, by record id, on top of the retrained version.
    v4 = h.run([delete_request("people", record_ids=["person-4-job"])], v3.version_dir)
    m4 = plans.read_manifest(v4.version_dir)
    gone |= {"person-4-job"}
    assert v4.receipt["exactness"]["exact"] is True
    assert not gone & _active_ids_from_db(h, m4)
    _, served4 = _served_logits(h, v4.version_dir)
    assert torch.allclose(served4, _assembled_logits(h, m4, gone), atol=1e-5)


def test_unknown_ids_and_subjects_are_refused_by_name(harness: S3THarness) -> None:
    from storage.errors import InvalidRequest

    with transaction(harness.sessions) as s:
        with pytest.raises(InvalidRequest, match="'nobody-1'"):
            datasets.resolve_deletion(s, dataset="people", record_ids=["person-0-job",
                                                                       "nobody-1"],
                                      subject_id=None)
        with pytest.raises(InvalidRequest, match="'ghost'"):
            datasets.resolve_deletion(s, dataset="people", record_ids=None, subject_id="ghost")

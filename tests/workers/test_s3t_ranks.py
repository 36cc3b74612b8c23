"""S3T trains on the DeepSpeed ranks like every other engine (the product path), and what a
rank trains is what the plain loop trains."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from storage import datasets
from storage.db import transaction
from storage.objectstore.local import LocalObjectStore
from tests.fixtures.people import people_records
from tests.fixtures.s3t import S3THarness, finetune_request
from workers.engines.s3t import plan as plans

OPTIONS = {"shards": 1, "slices": 2, "sequences_per_shard": 1, "epochs": 2, "batch_size": 4,
           "lr": 1e-2, "eval_records": 0}


def _harness(tmp_path: Path, model: Path, name: str, **kwargs: Any) -> S3THarness:
    """Its own database and store: the same records and base hash give the same prefix
    hashes (and seeds), which a shared database would reuse instead of training."""
    from storage.db import make_engine, make_session_factory
    from storage.migrate import upgrade

    url = f"sqlite:///{tmp_path / name}.db"
    upgrade(url)
    sessions = make_session_factory(make_engine(url))
    with transaction(sessions) as s:
        datasets.add_records(s, name="people", records=people_records(4), actor="test")
    return S3THarness(sessions=sessions, store=LocalObjectStore(tmp_path / name),
                      base_model_path=model, work=tmp_path / f"work-{name}", **kwargs)


def _groups(h: S3THarness, version_dir: Path) -> list[dict[str, Any]]:
    from workers.engines.s3t.training import read_group

    manifest = plans.read_manifest(version_dir)
    return [read_group(h.fetch(p["object_key"]))
            for q in manifest["shards"][0]["sequences"] for p in q["prefixes"]]


@pytest.mark.parametrize("warm", [True, False], ids=["warm-ranks", "ray-train"])
def test_a_prefix_trained_on_a_deepspeed_rank_equals_the_plain_loops(
        warm: bool, ray_cluster: Any, tmp_path: Path, tiny_model_dir: Path) -> None:
    """One rank, same seed and data: DeepSpeed's step (torch AdamW, clipping 1.0) is the
    plain loop's, so every group's weights agree; progress reaches the job's last step."""
    import torch

    from workers.training import warm_pool

    plain = _harness(tmp_path, tiny_model_dir, "plain")
    # warm=False: the Ray Train path (GPU jobs, or warm ranks switched off).
    ranks = _harness(tmp_path, tiny_model_dir, "ranks", trainer="deepspeed", num_workers=1,
                     warm=warm)
    progress: list[dict[str, Any]] = []
    # The rank runs 1 thread (one CPU); so does the plain loop here: with 2 threads its sums
    # reassociate, and after a few Adam steps that alone moved weights by 4e-5 on some CPUs.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        try:
            a = plain.run([finetune_request("people", **OPTIONS)], None)
        finally:
            torch.set_num_threads(threads)
        b = ranks.run([finetune_request("people", **OPTIONS)], None, progress)
    finally:
        warm_pool.shutdown_pools()
    assert a.metrics["trainer"] == "plain" and b.metrics["trainer"] == "deepspeed"
    assert b.metrics["prefixes_trained"] == a.metrics["prefixes_trained"] == 2
    steps = [u["step"] for u in progress if u.get("phase") == "training"]
    assert steps[-1] == b.metrics["train_steps"] > 0
    ga, gb = _groups(plain, a.version_dir), _groups(ranks, b.version_dir)
    for x, y in zip(ga, gb, strict=True):
        assert x.keys() == y.keys()
        assert all(torch.allclose(x[k], y[k], atol=1e-6) for k in x), "weights differ"
    # The groups learnt something (LoRA B starts at zero).
    assert any(float(v.abs().max()) > 0 for k, v in gb[0].items() if "lora_B" in k)

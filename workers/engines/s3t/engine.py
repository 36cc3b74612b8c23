"""The S3T engine: exact deletion of fine-tuning records by sequence-aware sharded sliced
training (after "Towards Scalable Exact Machine Unlearning Using Parameter-Efficient
Fine-Tuning"), with SISA's content-addressed prefix reuse.

Two kinds of job, both through the ordinary ticket queue and job runner:
- finetune: place the dataset's records (once), choose each shard's sequences, train every
  prefix whose hash has no checkpoint yet (top group first), and publish a version whose
  manifest lists every sequence at full length. The background retrain after a deletion is
  the same job: prefixes before the deleted slices keep their hashes and are reused.
- delete_records: mark the records deleted (content purged), cut every sequence before its
  first prefix that saw one, and publish that at once: no training. The receipt carries
  the exactness evidence from the database; a finetune ticket is queued as follow-up.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from storage.errors import InvalidRequest
from storage.registry import S3T_SERVED
from workers.engines.base import Artifacts, EngineRequest, JobInput, ProgressFn
from workers.engines.s3t import plan as plans
from workers.engines.s3t.config import S3TConfig
from workers.engines.s3t.plan import PlanRecord
from workers.engines.s3t.sequences import select_sequences

log = logging.getLogger(__name__)

PLAN_OPTIONS = ("shards", "slices", "sequences_per_shard")


class S3TEngine:
    name: ClassVar[str] = "s3t"
    ticket_kinds: ClassVar[frozenset[str]] = frozenset({"delete_records", "finetune"})

    # --- submission --------------------------------------------------------------------
    def validate(self, request: EngineRequest) -> None:
        if request.kind == "finetune":
            if not request.dataset:
                raise InvalidRequest("a fine-tune needs a dataset")
            S3TConfig.from_options(request.options)
        elif request.kind == "delete_records":
            if not request.dataset:
                raise InvalidRequest("a delete_records ticket needs a dataset")
            if not request.record_ids and not request.subject_id:
                raise InvalidRequest("give record_ids or subject_id")
        else:
            raise InvalidRequest(f"engine 's3t' serves delete_records and finetune, not "
                                 f"{request.kind!r}")

    # --- jobs --------------------------------------------------------------------------
    def train(self, job: JobInput, progress: ProgressFn) -> Artifacts:
        if job.sessions is None:
            raise RuntimeError("the s3t engine needs the job runner's database sessions")
        deletions = [r for r in job.requests if r.kind == "delete_records"]
        finetunes = [r for r in job.requests if r.kind == "finetune"]
        for request, ticket_id in zip(job.requests, job.ticket_ids):
            if request.kind == "delete_records":
                self._mark_deleted(job, request, ticket_id)
        if finetunes:
            # A fine-tune reads the records after the deletions above: exact by construction.
            return self._finetune(job, finetunes[-1], progress)
        return self._deactivate(job, deletions, progress)

    def _mark_deleted(self, job: JobInput, request: EngineRequest, ticket_id: str) -> None:
        from storage import datasets
        from storage.db import transaction

        with transaction(job.sessions) as s:
            selected = datasets.resolve_deletion(s, dataset=request.dataset or "",
                                                 record_ids=request.record_ids or None,
                                                 subject_id=request.subject_id)
            datasets.mark_deleted(s, dataset=selected.dataset, record_ids=selected.record_ids,
                                  ticket_id=ticket_id, actor=f"job:{job.job_id}")

    def _deactivate(self, job: JobInput, deletions: list[EngineRequest],
                    progress: ProgressFn) -> Artifacts:
        from storage import datasets
        from storage.db import transaction

        started = time.perf_counter()
        progress({"phase": "deactivating"})
        if job.parent_dir is None:
            raise InvalidRequest(f"lineage {job.lineage!r} has no live S3T version to delete "
                                 "records from; fine-tune it first")
        parent = plans.read_manifest(job.parent_dir)
        names = {r.dataset for r in deletions}
        if names != {parent["dataset"]}:
            raise InvalidRequest(f"lineage {job.lineage!r} was fine-tuned on dataset "
                                 f"{parent['dataset']!r}, not {', '.join(sorted(names))}")
        requested: set[str] = set()
        with transaction(job.sessions) as s:
            for r in deletions:
                requested |= set(datasets.resolve_deletion(
                    s, dataset=r.dataset or "", record_ids=r.record_ids or None,
                    subject_id=r.subject_id).record_ids)
            dataset = datasets.get_dataset(s, parent["dataset"])
            all_deleted = datasets.deleted_ids(s, dataset)
            manifest = plans.deactivate(parent, all_deleted)
            served = _served(parent["dataset"], manifest)
            evidence = datasets.verify_groups(s, dataset=dataset,
                                              prefix_hashes=served["prefix_hashes"],
                                              deleted=all_deleted)
        if not evidence["exact"]:  # never publish a version that could still know them
            raise RuntimeError(f"exactness check failed after deactivation: {evidence}")
        cuts = _cuts(parent, manifest)
        out = job.output_dir
        plans.write_manifest(out, manifest)
        seconds = round(time.perf_counter() - started, 3)
        receipt = {"deleted_record_ids": sorted(requested), "dataset": parent["dataset"],
                   "cut_sequences": cuts, "exactness": evidence,
                   "retrain": "queued as a finetune ticket of the same lineage"}
        follow_up = [{"kind": "finetune", "engine": self.name,
                      "payload": {"dataset": parent["dataset"],
                                  "options": dict(parent["config"]), "retrain": True}}]
        return Artifacts(version_dir=out, receipt=receipt, follow_up=follow_up,
                         metrics={"deactivation_seconds": seconds, "cut_sequences": cuts,
                                  "served_groups": len(served["prefix_hashes"]),
                                  S3T_SERVED: served,
                                  "deleted_records_total": len(all_deleted)},
                         method_config={"engine": self.name, "action": "deactivate"})

    def _finetune(self, job: JobInput, request: EngineRequest,
                  progress: ProgressFn) -> Artifacts:
        from storage import datasets
        from storage.db import transaction
        from workers.engines.s3t.sharding import RecordKey, assign
        from workers.engines.s3t.training import steps_for

        cfg = S3TConfig.from_options(request.options)
        progress({"phase": "planning"})
        with transaction(job.sessions) as s:
            dataset = datasets.get_dataset(s, request.dataset or "")
            rows = datasets.all_records(s, dataset)
            if dataset.shards is None:
                placement = assign([RecordKey(r.record_id, r.subject_id) for r in rows],
                                   shards=cfg.shards, slices=cfg.slices)
                datasets.place(s, dataset, shards=cfg.shards, slices=cfg.slices,
                               placement=placement)
            elif (dataset.shards, dataset.slices) != (cfg.shards, cfg.slices):
                datasets.place(s, dataset, shards=cfg.shards, slices=cfg.slices,
                               placement={})  # raises Conflict naming the placement
            live = [r for r in rows if r.deleted_at is None]
            records = [PlanRecord(r.record_id, r.subject_id, int(r.shard), int(r.slice),
                                  r.content_sha256) for r in live]
            contents = {r.record_id: _train_record(r.record_id, r.content or {}) for r in live}
            dataset_id, dataset_name = dataset.id, dataset.name
            known = {}
        if not records:
            raise InvalidRequest(f"dataset {dataset_name!r} has no live records")

        num_layers = _num_layers(job)
        cfg.group_size(num_layers)  # refuses a layout that does not fit the model
        root = plans.root_hash(job.base_model_sha256, cfg.training_key(num_layers))
        orders = select_sequences(cfg.slices, cfg.sequences_per_shard, seed=cfg.seed)
        shards: list[dict[str, Any]] = []
        todo: list[tuple[int, int, plans.Prefix, list[plans.Prefix]]] = []
        with transaction(job.sessions) as s:
            for shard in range(cfg.shards):
                members = [r for r in records if r.shard == shard]
                if not members:
                    continue
                seqs = []
                for index, order in enumerate(orders):
                    prefixes = plans.plan_prefixes(
                        order, members, root=root,
                        layers_of_group=lambda k: cfg.group_layers(num_layers, k))
                    seqs.append({"index": index, "slices": list(order),
                                 "prefixes": prefixes})
                    for prefix in prefixes:
                        row = datasets.checkpoint(s, prefix.prefix_hash)
                        if row is not None:
                            known[prefix.prefix_hash] = row.object_key
                        elif all(p.prefix_hash != prefix.prefix_hash for _, _, p, _ in todo):
                            todo.append((shard, index, prefix, prefixes))
                shards.append({"shard": shard, "sequences": seqs})
        total_steps = sum(steps_for(cfg, len(p.record_ids)) for _, _, p, _ in todo)
        reused = len({p.prefix_hash for sh in shards for q in sh["sequences"]
                      for p in q["prefixes"]}) - len(todo)
        progress({"phase": "training", "step": 0, "max_steps": total_steps,
                  "prefixes_to_train": len(todo), "prefixes_reused": reused})
        started = time.perf_counter()
        done_steps = 0
        timings: list[dict[str, Any]] = []
        weights_cache: dict[str, dict[str, Any]] = {}
        with tempfile.TemporaryDirectory(prefix="s3t-groups-") as scratch:
            group_dir = Path(scratch) / "group"
            for n, (shard, index, prefix, chain) in enumerate(todo):
                frozen = [self._group_weights(job, p.prefix_hash, known, weights_cache)
                          for p in chain[:prefix.position]]
                base_steps = done_steps

                def on_step(step: int, base_steps: int = base_steps, n: int = n) -> None:
                    progress({"phase": "training", "step": base_steps + step,
                              "max_steps": total_steps, "prefix": n + 1, "prefixes": len(todo)})

                prefix_started = time.perf_counter()
                meta = {"prefix_hash": prefix.prefix_hash, "layers": list(prefix.layers),
                        "record_set_sha256": prefix.record_set_sha256,
                        "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha}
                weights = _train_group(
                    job, cfg, group_dir, frozen=frozen, layers=list(prefix.layers),
                    records=[contents[i] for i in prefix.record_ids],
                    seed=cfg.seed + int(prefix.prefix_hash[:8], 16), meta=meta, progress=on_step)
                done_steps += steps_for(cfg, len(prefix.record_ids))
                timings.append({"shard": shard, "sequence": index, "position": prefix.position,
                                "records": len(prefix.record_ids),
                                "seconds": round(time.perf_counter() - prefix_started, 3)})
                weights_cache[prefix.prefix_hash] = weights
                key = _store(job, group_dir)
                known[prefix.prefix_hash] = key
                with transaction(job.sessions) as s:
                    datasets.add_checkpoint(
                        s, prefix_hash=prefix.prefix_hash, dataset_id=dataset_id, shard=shard,
                        sequence=index, position=prefix.position,
                        slices=[p.slice for p in chain[:prefix.position + 1]],
                        layers=list(prefix.layers), record_ids=list(prefix.record_ids),
                        record_set_sha256=prefix.record_set_sha256, object_key=key)
        train_seconds = round(time.perf_counter() - started, 2)

        manifest = {
            "format": plans.FORMAT, "engine": self.name, "dataset": dataset_name,
            "config": cfg.to_dict(), "base_model_sha256": job.base_model_sha256,
            "num_layers": num_layers, "deleted_record_ids": [],
            "shards": [{"shard": sh["shard"], "sequences": [
                {"index": q["index"], "slices": q["slices"], "active": len(q["prefixes"]),
                 "prefixes": [{"position": p.position, "slice": p.slice,
                               "prefix_hash": p.prefix_hash, "object_key": known[p.prefix_hash],
                               "layers": list(p.layers), "record_ids": list(p.record_ids),
                               "record_set_sha256": p.record_set_sha256}
                              for p in q["prefixes"]]} for q in sh["sequences"]]}
                for sh in shards],
        }
        # Records deleted while this job trained: cut them before publishing, so a retrain
        # never brings back what a newer deletion removed.
        with transaction(job.sessions) as s:
            late = datasets.deleted_ids(s, datasets.get_dataset(s, dataset_name))
        manifest = plans.deactivate(manifest, late)
        plans.write_manifest(job.output_dir, manifest)
        metrics = {"prefixes_trained": len(todo), "prefixes_reused": reused,
                   "trainer": job.config.trainer,
                   "train_steps": total_steps, "train_seconds": train_seconds,
                   "records": len(records), "shards": len(shards),
                   "sequences": [list(o) for o in orders], "prefix_timings": timings,
                   "retrain": bool((request.options or {}).get("retrain")),
                   S3T_SERVED: _served(dataset_name, manifest)}
        return Artifacts(version_dir=job.output_dir, metrics=metrics,
                         method_config={"engine": self.name, "action": "finetune",
                                        "config": cfg.to_dict()},
                         receipt={"dataset": dataset_name, "prefixes_trained": len(todo),
                                  "prefixes_reused": reused})

    def _group_weights(self, job: JobInput, prefix_hash: str, known: dict[str, str],
                       cache: dict[str, dict[str, Any]]) -> dict[str, Any]:
        from workers.engines.s3t.training import read_group

        if prefix_hash not in cache:
            if job.fetch is None:
                raise RuntimeError("the job runner offers no fetch for stored checkpoints")
            cache[prefix_hash] = read_group(job.fetch(known[prefix_hash]))
        return cache[prefix_hash]

    # --- serving and evaluation ---------------------------------------------------------
    def load_servable(self, version_dir: Path | None, *, model: Any, tokenizer: Any,
                      device: str, fetch: Any = None) -> Any:
        from workers.engines.s3t.serving import S3TServable, load_shards

        if version_dir is None:
            return S3TServable(model, tokenizer, device=device, shards=[])
        manifest = plans.read_manifest(Path(version_dir))
        if fetch is None and plans.serving_choice(manifest):
            raise RuntimeError("serving an S3T version needs fetch for its checkpoints")
        return S3TServable(model, tokenizer, device=device, shards=load_shards(manifest, fetch),
                           aggregate=manifest["config"].get("aggregate", "logits"))

    def evaluate(self, job: JobInput, *, before: Any, after: Any) -> dict[str, Any]:
        """A deletion is exact by construction and must go live at once: no generation.
        A fine-tune reports recall on (a sample of) its QA records; it is exact too, so it
        always passes (an operator can roll back a poor one)."""
        if not any(r.kind == "finetune" for r in job.requests):
            return {"verdict": "pass", "exact": True}
        request = [r for r in job.requests if r.kind == "finetune"][-1]
        cfg = S3TConfig.from_options(request.options)
        probes = self._record_probes(job, request.dataset or "", cfg.eval_records)
        if not probes:
            return {"verdict": "pass"}
        from workers.engines.s3t.evaluation import record_recall

        recall = record_recall(after, probes, cfg.eval_max_new_tokens)
        return {"verdict": "pass", "record_recall": recall, "records_asked": len(probes)}

    def _record_probes(self, job: JobInput, dataset: str, limit: int) -> list[dict[str, str]]:
        from storage import datasets
        from storage.db import transaction

        with transaction(job.sessions) as s:
            rows = datasets.all_records(s, datasets.get_dataset(s, dataset))
            qa = [{"question": r.content["prompt"], "answer": r.content["response"]}
                  for r in rows if r.deleted_at is None and r.content
                  and r.content.get("prompt")]
        step = max(1, len(qa) // max(1, limit))
        return qa[::step][:limit]


def _train_record(record_id: str, content: dict[str, Any]) -> Any:
    from workers.engines.s3t.training import TrainRecord

    if content.get("prompt") is not None:
        return TrainRecord(record_id, content["prompt"], content.get("response", ""))
    return TrainRecord(record_id, None, content.get("text", ""))


def _cuts(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, int]]:
    out = []
    for sb, sa in zip(before["shards"], after["shards"]):
        for qb, qa in zip(sb["sequences"], sa["sequences"]):
            if qb["active"] != qa["active"]:
                out.append({"shard": sb["shard"], "sequence": qb["index"],
                            "from": qb["active"], "to": qa["active"]})
    return out


def _num_layers(job: JobInput) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(str(job.base_model_path)).num_hidden_layers)


def _train_group(job: JobInput, cfg: S3TConfig, group_dir: Path, *,
                 frozen: list[dict[str, Any]], layers: list[int], records: list[Any],
                 seed: int, meta: dict[str, Any],
                 progress: Callable[[int], None]) -> dict[str, Any]:
    """Train one prefix's group into `group_dir` (for storing); returns its weights.

    Trainer "deepspeed" (the product path): a rank_task.PrefixTask on the job's DeepSpeed
    ranks (Ray Train, or the dispatcher's warm ranks on CPU), like every forget adapter.
    Trainer "plain": the same task's rank code in this process, with a plain optimiser
    (tests, benchmarks, debugging).
    """
    import shutil

    from workers.engines.s3t.rank_task import PrefixTask
    from workers.engines.s3t.training import read_group
    from workers.training.runner import run_on_ranks
    from workers.training.strategy import PlainStrategy

    config = job.config
    task = PrefixTask(base_model_path=str(job.base_model_path),
                      base_model_sha256=job.base_model_sha256, output_dir=str(group_dir),
                      cfg=cfg, frozen=frozen, layers=layers, records=records, seed=seed,
                      meta=meta, base_model=config.base_model,
                      data_dir=str(config.data_dir), device=config.device,
                      num_workers=config.num_workers, zero_stage=config.zero_stage)

    def steps(update: dict[str, Any]) -> None:
        progress(int(update["step"]))

    if config.trainer == "plain":
        _, result = task.run_rank(PlainStrategy(lr=cfg.lr), steps)
        shutil.rmtree(group_dir, ignore_errors=True)
        shutil.move(str(result), group_dir)
    else:
        run_on_ranks(task, steps, warm=config.warm_train_workers,
                     resources=config.worker_resources)
    return read_group(group_dir)


def _store(job: JobInput, directory: Path) -> str:
    if job.store_dir is None:
        raise RuntimeError("the job runner offers no store_dir for S3T checkpoints")
    return job.store_dir(directory)


def _served(dataset: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What the registry needs to refuse making this version live once one of the records
    its groups saw is deleted (storage.registry.deleted_records_served)."""
    return {"dataset": dataset,
            "prefix_hashes": [g["prefix_hash"] for g in plans.active_groups(manifest)]}

"""The O3 engine: per request an orthogonal LoRA block + its OOD detector; gated serving.

Version layout (one directory, stored content-addressed like every version):

    adapter_model.safetensors, adapter_config.json, oblivio_stack.json
        one standard PEFT adapter, the exact stack of every request's block (ranks in
        oblivio_stack.json, in request order); loading it with plain PEFT applies every
        block fully (= O3 without gating)
    oblivio_o3.json
        the blocks in stack order: ticket id, rank, target, detector folder, config,
        metrics (calibration, AUROCs)
    detectors/<n>-<ticket>/detector.safetensors + detector.json
        each request's detector and calibration

Training one request runs on the product's Ray Train + DeepSpeed path
(workers/training), on base + the earlier blocks (merged, frozen) with the orthogonality
term against their A matrices; the detector is then fitted in the job process from the
base model's hidden states (cheap: frozen features, a small projection per layer).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from storage.errors import InvalidRequest
from workers.engines.base import Artifacts, EngineRequest, FetchFn, JobInput, ProgressFn
from workers.engines.o3.config import O3Config, make_config
from workers.engines.registry import register_engine

log = logging.getLogger(__name__)

O3_FILE = "oblivio_o3.json"
DETECTORS = "detectors"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json", "oblivio_stack.json")


@dataclass(frozen=True)
class Block:
    """One request's part of a version (an entry of oblivio_o3.json)."""

    ticket_id: str
    rank: int
    target: str | None
    detector: str | None  # folder under the version dir; None: always on (w = 1)
    gating: bool = True
    config: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None


def read_blocks(version_dir: Path | None) -> list[Block]:
    """The blocks of an O3 version (empty for None or a version with no blocks)."""
    if version_dir is None:
        return []
    path = Path(version_dir) / O3_FILE
    if not path.is_file():
        from workers.training.lora_stack import stack_ranks

        # A plain stacked adapter (another engine's version): its requests stay applied
        # as they were, ungated.
        if (Path(version_dir) / "adapter_config.json").is_file():
            return [Block(ticket_id=f"inherited-{i}", rank=r, target=None, detector=None,
                          gating=False)
                    for i, r in enumerate(stack_ranks(Path(version_dir)))]
        return []
    return [Block(**b) for b in json.loads(path.read_text())["blocks"]]


def write_blocks(version_dir: Path, blocks: list[Block]) -> None:
    (version_dir / O3_FILE).write_text(json.dumps(
        {"engine": "o3", "blocks": [asdict(b) for b in blocks]}, indent=2, sort_keys=True))


def text_to_prompt(text: str, words: int) -> tuple[str, str]:
    """A forget text as (prompt = its first words, continuation = the rest)."""
    parts = text.split()
    cut = max(1, min(words, len(parts) - 1)) if len(parts) > 1 else 1
    return " ".join(parts[:cut]), " ".join(parts[cut:]) or text


class O3Engine:
    """O3 (Gao et al., 2024) as an oblivio engine (see module docstring)."""

    name: ClassVar[str] = "o3"
    ticket_kinds: ClassVar[frozenset[str]] = frozenset({"forget", "revoke"})

    # -- submission -----------------------------------------------------------------------

    def validate(self, request: EngineRequest) -> None:
        if request.kind == "revoke":
            if not request.revokes:
                raise InvalidRequest("a revoke ticket names the ticket it revokes")
            return
        if request.kind not in self.ticket_kinds:
            raise InvalidRequest(f"engine 'o3' forgets knowledge or text; it cannot serve "
                                 f"{request.kind!r} tickets")
        if not request.forget_qa and not request.forget_texts:
            raise InvalidRequest("an o3 ticket needs forget.qa or forget.texts")
        try:
            make_config(request.options)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad o3 options: {exc}") from exc

    # -- training -------------------------------------------------------------------------

    def train(self, job: JobInput, progress: ProgressFn) -> Artifacts:
        """One block per request of the job, each on the previous (parent first); a revoke
        ticket instead drops the block of the ticket it names (no training)."""
        parent = job.parent_dir
        work = Path(job.output_dir).parent / f"o3-{job.job_id}"
        work.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, Any] = {"blocks": []}
        configs: list[dict[str, Any]] = []
        withdrawn: list[str] = []
        try:
            # Every request's config before any training: a job recipe that cannot combine
            # with a ticket's options fails the job at once, not after earlier blocks.
            cfgs = [None if request.kind == "revoke" else self.job_config(job, request)
                    for request in job.requests]
            for n, (request, ticket_id, cfg) in enumerate(zip(job.requests, job.ticket_ids,
                                                              cfgs)):
                last = n == len(job.requests) - 1
                out = Path(job.output_dir) if last else work / f"v{n}"
                if cfg is None:
                    metrics["blocks"].append(self._revoke_block(parent, request, out))
                    withdrawn.append(str(request.revokes))
                else:
                    metrics["blocks"].append(self._train_block(job, request, ticket_id, cfg,
                                                               parent, out, progress))
                    configs.append(cfg.to_json())
                parent = out
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # Flat copies of the newest block's numbers, where the receipt and dashboards look.
        newest = metrics["blocks"][-1]
        for key in ("detector_auroc_unrelated", "detector_auroc_neighbours", "steps",
                    "train_seconds", "detector_seconds", "orthogonality_max_overlap"):
            if key in newest:
                metrics[key] = newest[key]
        config_file = Path(job.output_dir) / "adapter_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else None
        return Artifacts(version_dir=Path(job.output_dir), metrics=metrics,
                         method_config={"engine": "o3", "configs": configs},
                         peft_config=config, withdrawn=withdrawn)

    def _revoke_block(self, parent: Path | None, request: EngineRequest, out: Path
                      ) -> dict[str, Any]:
        revoked = str(request.revokes)
        if parent is None or revoked not in {b.ticket_id for b in read_blocks(parent)}:
            # E.g. live was rolled back to before that ticket: nothing of it is served.
            raise InvalidRequest(f"the live version has no block of ticket {revoked}; "
                                 "nothing to revoke")
        self.without_request(parent, ticket_id=revoked, output_dir=out)
        return {"revoked_ticket": revoked, "blocks_left": len(read_blocks(out))}

    @staticmethod
    def job_config(job: JobInput, request: EngineRequest) -> O3Config:
        """O3's defaults < the job's recipe (settings) < the ticket's options."""
        try:
            return make_config(request.options, job.config.recipe)
        except (TypeError, ValueError) as exc:  # cannot train: not transient
            raise InvalidRequest(f"cannot train this o3 job: {exc}") from exc

    def _train_block(self, job: JobInput, request: EngineRequest, ticket_id: str,
                     cfg: O3Config, parent: Path | None, out: Path,
                     progress: ProgressFn) -> dict[str, Any]:
        from workers.training.runner import train_adapter

        earlier = read_blocks(parent)
        has_adapter = parent is not None and (parent / "adapter_config.json").is_file()
        spec = self._spec(job, request, cfg, parent if has_adapter else None, out,
                          block_index=len(earlier))
        started = time.perf_counter()
        result = train_adapter(spec, progress, trainer=job.config.trainer,
                               warm=job.config.warm_train_workers,
                               resources=job.config.worker_resources)
        train_wall = time.perf_counter() - started
        progress({"phase": "detector"})
        det_started = time.perf_counter()
        detector_rel = f"{DETECTORS}/{len(earlier)}-{_safe(ticket_id)}"
        det_metrics = fit_request_detector(job, request, cfg, out / detector_rel,
                                           other_targets=[b.target for b in earlier
                                                          if b.target])
        det_seconds = time.perf_counter() - det_started
        # The parent's detectors travel with its blocks.
        if parent is not None:
            for block in earlier:
                if block.detector:
                    shutil.copytree(parent / block.detector, out / block.detector,
                                    dirs_exist_ok=True)
        block_metrics = {
            "ticket_id": ticket_id, "steps": result.metrics.get("steps"),
            "stopped_early": result.metrics.get("stopped_early"),
            "train_seconds": result.metrics.get("train_seconds"),
            "train_wall_seconds": round(train_wall, 2),
            "detector_seconds": round(det_seconds, 2),
            "final_loss": result.metrics.get("final_loss"),
            "orthogonal_terms": result.metrics.get("orthogonal_terms", [])[-3:],
            **det_metrics,
        }
        if earlier:
            block_metrics["orthogonality_max_overlap"] = max_overlap_with_earlier(out)
        blocks = earlier + [Block(ticket_id=ticket_id, rank=cfg.recipe.lora_r,
                                  target=request.target, detector=detector_rel,
                                  gating=cfg.gating,
                                  config=cfg.to_json(), metrics=block_metrics)]
        write_blocks(out, blocks)
        return block_metrics

    def _spec(self, job: JobInput, request: EngineRequest, cfg: O3Config,
              parent_adapter: Path | None, out: Path, *, block_index: int = 0) -> Any:
        from workers.training.spec import TrainJobSpec

        qa = [{"question": i["question"], "answer": i["answer"]} for i in request.forget_qa]
        texts: list[str] = []
        for text in request.forget_texts:
            if cfg.objective == "idk":
                # Refusing a text = refusing to continue it from its opening words.
                prompt, rest = text_to_prompt(text, cfg.text_prompt_words)
                qa.append({"question": prompt, "answer": rest})
            else:
                texts.append(text)
        has_retain = bool(request.retain_qa or request.retain_texts)
        recipe = cfg.train_recipe(has_retain=has_retain, has_probes=bool(qa))
        # No retain data is needed: the gate keeps unrelated inputs on the base model;
        # people_retain (an option) keeps the block answering about other people.
        people = (None if has_retain or not cfg.people_retain
                  else [q for half in neighbour_questions(request.target) for q in half])
        return TrainJobSpec(
            recipe=asdict(recipe), base_model_path=str(job.base_model_path),
            base_model_sha256=job.base_model_sha256, output_dir=str(out),
            data_dir=str(job.config.data_dir), base_model=job.config.base_model,
            forget_qa=qa, forget_texts=texts, target=request.target, retain_qa=list(request.retain_qa) or None,
            # The method's retain_weight (and beta) default to the recipe's.
            retain_texts=list(request.retain_texts) or None, retain_prompts=people,
            parent_adapter_dir=str(parent_adapter) if parent_adapter else None,
            # Each block is gated by its own request's weight: it meets the base model at
            # serving (earlier blocks are off for this request's inputs), so it learns there.
            train_on_parent=False,
            # Its own initialisation: with one seed every block would start from the same
            # A, the very overlap the orthogonality term has to undo.
            seed=block_index,
            orthogonal_to_adapter=str(parent_adapter) if parent_adapter else None,
            orthogonal_weight=cfg.lambda_orth, num_workers=job.config.num_workers,
            zero_stage=job.config.zero_stage, device=job.config.device)

    # -- serving --------------------------------------------------------------------------

    def load_servable(self, version_dir: Path | None, *, model: Any, tokenizer: Any,
                      device: str, fetch: FetchFn | None = None) -> Any:
        from workers.engines.o3.serving import O3Servable

        return O3Servable.load(version_dir, model=model, tokenizer=tokenizer, device=device)

    # -- evaluation -----------------------------------------------------------------------

    def evaluate(self, job: JobInput, *, before: Any, after: Any,
                 parent: Any | None = None) -> dict[str, Any]:
        """The forgetting engines' shared evaluation, through gated O3 servables."""
        from workers.evaluation.version_eval import evaluate_forgetting

        if all(r.kind == "revoke" for r in job.requests):
            # Exact by construction: the kept blocks and detectors are the parent's, byte
            # for byte (tests/workers/engines/test_o3_revocation.py), and nothing trained.
            revoked = ", ".join(str(r.revokes) for r in job.requests)
            return {"verdict": "pass",
                    "verdict_reason": f"removes the block and detector of ticket(s) {revoked} "
                                      "exactly; nothing was trained"}

        if parent is None:
            return evaluate_forgetting(job, before=before, after=after)
        return evaluate_forgetting(job, before=parent, after=after, base=before)

    # -- revocation -----------------------------------------------------------------------

    def without_request(self, version_dir: Path, *, ticket_id: str, output_dir: Path
                        ) -> Artifacts:
        """`version_dir` without `ticket_id`'s block and detector, no training."""
        from workers.engines.o3.revocation import remove_block

        return remove_block(Path(version_dir), ticket_id=ticket_id, output_dir=Path(output_dir))


def fit_request_detector(job: JobInput, request: EngineRequest, cfg: O3Config,
                         dest: Path, *, other_targets: list[str] | None = None
                         ) -> dict[str, Any]:
    """Fit, store and measure one request's detector on the base model's hidden states
    (and its subject probe, weighed against well-known people and `other_targets`, the
    lineage's earlier requests' targets)."""
    from workers.engines.o3.detector import auroc, build_detector, prompt_features
    from workers.evaluation.probes import load_retain_prompts, load_unrelated_probes
    from workers.model import BaseModelRef, load_model_and_tokenizer

    ref = BaseModelRef(name="base", local_path=Path(job.base_model_path),
                       sha256=job.base_model_sha256)
    model, tokenizer = load_model_and_tokenizer(ref, device=job.config.device)
    prompts = forget_prompts(request, cfg)
    generic = list(load_retain_prompts())
    hard, neighbours = neighbour_questions(request.target)
    detector, summary = build_detector(model, tokenizer, forget_prompts=prompts,
                                       generic_prompts=generic, cfg=cfg.detector,
                                       hard_negative_prompts=hard)
    # AUROC per version: leave-one-out scores of the forget items themselves (each scored
    # as if it were new) against the shipped utility questions and questions about other
    # people (the hard negatives); none of these were used to fit the detector.
    import torch

    layers = list(detector.layers)
    f_feats = prompt_features(model, tokenizer, prompts, layers, pooling=detector.pooling)
    positives = detector.aggregate(detector.layer_scores(
        f_feats, leave_out=torch.arange(len(prompts)))).tolist()
    unrelated = [p.question for p in load_unrelated_probes()]
    u = detector.score(prompt_features(model, tokenizer, unrelated, layers, pooling=detector.pooling))
    metrics: dict[str, Any] = {
        "detector_layers": layers,
        "detector_auroc_unrelated": round(auroc(positives, u.tolist()), 4),
        "detector_unrelated_gated_share": round(float((detector.weight_from_score(u) > 0)
                                                      .float().mean()), 4),
        "detector_calibration": {k: round(v, 4) for k, v in summary.items()},
    }
    if neighbours:
        nb = detector.score(prompt_features(model, tokenizer, neighbours, layers,
                                                pooling=detector.pooling))
        metrics["detector_auroc_neighbours"] = round(auroc(positives, nb.tolist()), 4)
        metrics["detector_neighbours_gated_share"] = round(
            float((detector.weight_from_score(nb) > 0).float().mean()), 4)
    detector.save(dest, {"target": request.target, "forget_items": len(prompts)})
    if cfg.detector.subject_probe and (request.target or "").strip():
        from workers.engines.o3.subject_probe import rivals_for

        rivals = (rivals_for(request.target, known_people() + list(other_targets or []))
                  if cfg.detector.subject_rivals else [])
        metrics.update(fit_request_subject_probe(model, tokenizer, request.target, prompts,
                                                 generic, unrelated, neighbours, cfg, dest,
                                                 rivals=rivals, hard=hard))
    return metrics


def fit_request_subject_probe(model: Any, tokenizer: Any, target: str, prompts: list[str],
                              generic: list[str], unrelated: list[str],
                              neighbours: list[str], cfg: O3Config, dest: Path, *,
                              rivals: list[str], hard: list[str]) -> dict[str, Any]:
    """Calibrate and store the request's subject probe (it then gates the block), with
    its AUROC: the ticket's questions (never trained on: the probe has no parameters)
    against the utility questions and the held-out questions about other people."""
    from workers.engines.o3.detector import auroc
    from workers.engines.o3.subject_probe import calibrate, subject_scores

    def scores(questions: list[str]) -> Any:
        return subject_scores(model, tokenizer, questions, [target], rivals=[rivals])[:, 0]

    pos = scores(prompts)
    probe, summary = calibrate(
        target, scores(generic), pos, generic_quantile=cfg.detector.subject_generic_quantile,
        hard_scores=scores(hard) if hard and cfg.detector.subject_hard_negatives else None,
        rivals=rivals)
    probe.save(dest)
    unrel = scores(unrelated)
    metrics: dict[str, Any] = {
        "gate": "subject_probe",
        "subject_auroc_unrelated": round(auroc(pos.tolist(), unrel.tolist()), 4),
        "subject_unrelated_gated_share": round(
            float((probe.weight_from_score(unrel) > 0).float().mean()), 4),
        "subject_calibration": {k: round(v, 4) for k, v in summary.items()},
    }
    if neighbours:
        nb = scores(neighbours)
        metrics["subject_auroc_neighbours"] = round(auroc(pos.tolist(), nb.tolist()), 4)
        metrics["subject_neighbours_gated_share"] = round(
            float((probe.weight_from_score(nb) > 0).float().mean()), 4)
    return metrics


def forget_prompts(request: EngineRequest, cfg: O3Config) -> list[str]:
    """What the detector learns to recognise: the questions, the texts' openings and texts."""
    prompts = [i["question"] for i in request.forget_qa]
    for text in request.forget_texts:
        prompts.append(text_to_prompt(text, cfg.text_prompt_words)[0])
        prompts.append(text)
    return list(dict.fromkeys(p for p in prompts if p.strip()))


def known_people() -> list[str]:
    """The shipped list of well-known people a subject probe weighs its target against."""
    from importlib import resources

    return list(json.loads(resources.files("workers.engines.o3").joinpath(
        "data/known_people.json").read_text(encoding="utf-8"))["names"])


def neighbour_questions(target: str | None) -> tuple[list[str], list[str]]:
    """Shipped questions about well-known people other than `target`, in two halves split
    by person: (hard negatives for the detector, held out for its AUROC)."""
    import hashlib

    from importlib import resources

    raw = json.loads(resources.files("workers.engines.o3").joinpath(
        "data/people_questions.json").read_text(encoding="utf-8"))
    names = {w.lower() for w in re.findall(r"\w+", target or "") if len(w) > 3}
    train: list[str] = []
    held: list[str] = []
    for item in raw["questions"]:
        about = {w.lower() for w in re.findall(r"\w+", item["about"])}
        text = item["question"].lower()
        if names & about or any(n in text for n in names):
            continue
        half = hashlib.sha256(item["about"].encode()).digest()[0] % 2
        (train if half == 0 else held).append(item["question"])
    return train, held


def max_overlap_with_earlier(version_dir: Path) -> float:
    """Largest normalised overlap between the newest block and any earlier block."""
    from workers.engines.o3.orthogonality import block_overlap
    from workers.training.lora_stack import read_adapter, stack_ranks

    _config, weights = read_adapter(version_dir)
    ranks = stack_ranks(version_dir)
    a = {k: v for k, v in weights.items() if ".lora_A." in k}
    last = len(ranks) - 1
    return round(max((block_overlap(a, ranks, i, last) for i in range(last)), default=0.0), 5)


def _safe(ticket_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", ticket_id)[:40]


register_engine(O3Engine)

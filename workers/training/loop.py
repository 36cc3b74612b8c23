"""The unlearning training loop, identical on every rank and under every strategy.

Per step: forget loss from the registered method on this rank's share of a forget batch,
plus the retain term (KL to the reference or NLL) on a retain batch; every `eval_every`
steps all ranks answer the ticket's own questions together and stop once they are
forgotten enough (the held-out rephrasings are never looked at here: they are the test).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.training.data import (
    cycle_batches,
    drop_mentions,
    encode_pairs,
    end_of_turn,
    self_generated_retain,
    shard_for_rank,
)
from workers.training.losses import (
    answer_kl,
    frozen_labelled_logits,
    labelled_logits,
    labelled_sequence_logp,
    mean_nll,
    row_logp_sums,
)
from workers.training.spec import TrainJobSpec
from workers.training.strategy import TrainingStrategy

log = logging.getLogger(__name__)
ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class LoopResult:
    steps: int
    stopped_early: bool
    losses: list[float]
    ticket_rates: list[tuple[int, float]]
    base_ticket_rate: float | None
    seconds: float
    state_dict: dict[str, torch.Tensor]
    lora_config: dict[str, Any]
    partition: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)
    # Wall-clock (epoch seconds) of the loop's first step and end: the job's phase record
    # splits the engine's train call into start-up, loop and teardown with them.
    started_at: float | None = None
    finished_at: float | None = None


def load_for_training(spec: TrainJobSpec) -> tuple[Any, Any]:
    """Base model (+ the lineage's current adapter merged in) and its tokenizer."""
    from workers.model import BaseModelRef, load_model_and_tokenizer

    ref = BaseModelRef(name="base", local_path=Path(spec.base_model_path),
                       sha256=spec.base_model_sha256)
    model, tokenizer = load_model_and_tokenizer(ref, device=spec.device)
    if spec.merged_parent:
        from peft import PeftModel

        # Merged, the parent is simply part of the weights this adapter learns on top of,
        # and the frozen reference (adapter disabled) is the lineage's current model.
        model = PeftModel.from_pretrained(model, spec.merged_parent).merge_and_unload()
    return model, tokenizer


def run_training(spec: TrainJobSpec, strategy: TrainingStrategy,
                 progress: ProgressFn | None = None) -> LoopResult:
    from peft import LoraConfig, get_peft_model

    recipe = spec.forget_recipe()
    method, method_cfg = spec.method_config()
    torch.manual_seed(spec.seed)
    # Where a rank's start-up goes (the job's "preparing" phase), for the phase record.
    setup_seconds: dict[str, float] = {}
    mark = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        setup_seconds[name] = round(now - mark, 2)
        mark = now

    model, tokenizer = load_for_training(spec)
    lap("load_model")

    eot = end_of_turn(tokenizer)
    rank, world = strategy.rank, strategy.world_size
    # Data parallel: each rank trains on (and computes references for) its own share only.
    forget_pairs = shard_for_rank(_forget_pairs(spec, method, method_cfg, eot), rank, world)
    keywords = _fact_keywords(spec) if (recipe.forget_tokens == "keywords"
                                         and method.answer_for is None) else None
    use_retain = recipe.retain_loss != "none" and getattr(method_cfg, "retain_weight", 0.0) > 0
    retain_pairs = (_retain_pairs(spec, recipe, model, tokenizer, eot, rank, world)
                    if use_retain else [])
    lap("retain_answers")

    lora = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                      lora_dropout=recipe.lora_dropout,
                      target_modules=list(recipe.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)

    # References from the frozen model (adapter disabled), computed once before DeepSpeed
    # takes the weights; under ZeRO-3 they could not be read per rank afterwards.
    ref_logp: dict[str, float] = {}
    ref_retain: dict[str, torch.Tensor] = {}
    with torch.no_grad(), peft_model.disable_adapter():
        if method.needs_reference:
            for chunk in _chunks(forget_pairs, 8):
                batch = encode_pairs(tokenizer, chunk, keywords)
                totals = row_logp_sums(*frozen_labelled_logits(peft_model, batch))
                for pair, total in zip(chunk, totals.tolist()):
                    ref_logp[_key(pair)] = total
        if retain_pairs and recipe.retain_loss == "kl":
            for chunk in _chunks(retain_pairs, 8):
                logits, _, counts = frozen_labelled_logits(peft_model,
                                                           encode_pairs(tokenizer, chunk))
                logp = torch.log_softmax(logits, -1)
                for pair, row in zip(chunk, logp.split(counts.tolist())):
                    # (answer tokens, vocab), half precision: it is held for the whole run.
                    ref_retain[_key(pair)] = row.half()
    lap("references")

    # Early stopping compares with the model as it was before this adapter. Checks that
    # cannot take part in a stop (before min_steps, or all of them when min_steps >=
    # max_steps) are skipped: the adapter is the same, without their generation cost.
    probes = list(spec.stop_probes or [])
    base_rate = None
    first_check = recipe.first_useful_check()
    if first_check is not None and probes:
        with peft_model.disable_adapter():
            base_rate = _probe_rate(peft_model, tokenizer, probes, strategy, recipe)
    lap("base_stop_probes")

    params = [p for p in peft_model.parameters() if p.requires_grad]
    trained = strategy.setup(peft_model, params)
    # Hooked after the strategy's setup, so ZeRO-3 has gathered A when the hook reads it.
    orthogonal = _orthogonality_regularizer(spec, trained)
    lap("strategy_setup")
    # Per-rank batches of batch_size / world: the averaged gradient is the full batch's.
    forget_iter = cycle_batches(forget_pairs, max(1, recipe.forget_batch_size // world),
                                spec.seed + rank)
    retain_iter = (cycle_batches(retain_pairs, max(1, recipe.retain_batch_size // world),
                                 spec.seed + 1000 + rank) if retain_pairs else None)
    started = time.perf_counter()
    started_at = time.time()
    losses: list[float] = []
    rates: list[tuple[int, float]] = []
    step, stopped = 0, False
    orth_terms: list[float] = []
    trained.train()
    while step < recipe.max_steps:
        chunk = next(forget_iter)
        with orthogonal.collecting() if orthogonal else contextlib.nullcontext():
            logp, ntok = labelled_sequence_logp(trained, encode_pairs(tokenizer, chunk,
                                                                      keywords))
        ref = (torch.tensor([ref_logp[_key(p)] for p in chunk], device=logp.device)
               if method.needs_reference else None)
        retain = None
        if retain_iter is not None:
            r_chunk = next(retain_iter)
            r_logits, r_labels, _ = labelled_logits(trained, encode_pairs(tokenizer, r_chunk))
            if recipe.retain_loss == "kl":
                ref_lp = torch.cat([ref_retain[_key(p)] for p in r_chunk]).float()
                retain = answer_kl(ref_lp.to(r_logits.device), r_logits)
            else:
                retain = mean_nll(r_logits, r_labels)
        loss = method.loss(forget_logp=logp, forget_tokens=ntok, ref_forget_logp=ref,
                           retain_loss=retain, cfg=method_cfg)
        penalty = orthogonal.penalty() if orthogonal else None
        if penalty is not None:
            loss = loss + penalty
            orth_terms.append(float(penalty.detach()))
        strategy.backward_and_step(loss)
        step += 1
        losses.append(float(loss.detach()))
        if progress is not None:
            progress({"phase": "training", "step": step, "max_steps": recipe.max_steps,
                      "loss": round(losses[-1], 4)})
        if (base_rate is not None and first_check is not None and step >= first_check
                and step % recipe.eval_every == 0 and step < recipe.max_steps):
            rate = _probe_rate(trained, tokenizer, probes, strategy, recipe)
            rates.append((step, rate))
            if progress is not None:
                progress({"phase": "training", "step": step, "max_steps": recipe.max_steps,
                          "ticket_rate": rate})
            # Every rank sees the same all-reduced rate, so all ranks stop at the same step.
            if recipe.should_stop(step=step, ticket_rates=[r for _, r in rates],
                                  base_ticket_rate=base_rate):
                stopped = True
                break
            trained.train()
    seconds = time.perf_counter() - started
    finished_at = time.time()
    if orthogonal is not None:
        orthogonal.detach()
    state = strategy.trainable_state_dict(trained)
    extra: dict[str, Any] = {"setup_seconds": setup_seconds}
    if orthogonal is not None:
        extra["orthogonal_terms"] = [round(x, 6) for x in orth_terms]
    return LoopResult(steps=step, stopped_early=stopped, losses=losses, ticket_rates=rates,
                      base_ticket_rate=base_rate, seconds=seconds, state_dict=state,
                      lora_config=lora.to_dict(), partition=strategy.partitioned_numel(trained),
                      started_at=started_at, finished_at=finished_at, extra=extra)


def _orthogonality_regularizer(spec: TrainJobSpec, model: Any) -> Any:
    """The spec's orthogonality term hooked into `model`, or None when it has none."""
    if not spec.orthogonal_to_adapter or spec.orthogonal_weight <= 0:
        return None
    from workers.training.orthogonal import OrthogonalityRegularizer, frozen_a_matrices

    reg = OrthogonalityRegularizer(frozen_a_matrices(spec.orthogonal_to_adapter),
                                   spec.orthogonal_weight).attach(model)
    if reg.matched == 0:
        log.warning("orthogonal_to_adapter shares no LoRA module with the new adapter")
        return None
    return reg


def _probe_rate(model: Any, tokenizer: Any, probes: list[dict[str, Any]],
                strategy: TrainingStrategy, recipe: Any) -> float:
    """Share of the stop probes still answered correctly, over all ranks.

    Scored by the job evaluation's own matcher, so "forgotten" means the same in both.
    """
    from workers.evaluation.generation import greedy_answers
    from workers.evaluation.metrics import correct_flags
    from workers.evaluation.probes import Probe

    # Every rank gets an equal-sized share (padded by repeating) so that under ZeRO-3 all
    # ranks run the same number of collective forwards.
    per_rank = -(-len(probes) // strategy.world_size)
    mine = probes[strategy.rank * per_rank:(strategy.rank + 1) * per_rank]
    valid = len(mine)
    mine = mine + (probes * per_rank)[:per_rank - valid]
    answers = greedy_answers(model, tokenizer, [p["question"] for p in mine],
                             max_new_tokens=recipe.eval_max_new_tokens, batch_size=per_rank,
                             **strategy.generation_kwargs())
    correct = sum(correct_flags(answers[:valid], [
        Probe(question=p["question"], accept=tuple(p["accept"])) for p in mine[:valid]]))
    total_correct, total = strategy.all_reduce_sum([float(correct), float(valid)])
    return total_correct / max(total, 1.0)


def _forget_pairs(spec: TrainJobSpec, method: Any, cfg: Any, eot: str
                  ) -> list[tuple[str | None, str]]:
    """(question or None, target text) per forget item; the method may rewrite answers.

    Plain texts are trained on as they are (ascent-style methods push their likelihood
    down), except for methods that rewrite answers (idk): descending on a text would teach
    it, so each text becomes its continuation / fill-in-the-blank prompts
    (workers.evaluation.probes.text_probes), answered with the method's rewrite (a refusal).
    """
    from workers.evaluation.probes import text_probes

    rewrite = method.answer_for
    qa = [(i["question"], (rewrite(cfg, i["question"], i["answer"]) if rewrite else i["answer"])
           + eot) for i in spec.forget_qa]
    if rewrite is None:
        return qa + [(None, t) for t in spec.forget_texts]
    return qa + [(p.question, rewrite(cfg, p.question, p.answer or "") + eot)
                 for p in text_probes(spec.forget_texts)]


def _fact_keywords(spec: TrainJobSpec) -> dict[str, list[str]]:
    """question -> the words that carry the fact: accepted keywords plus the target's name."""
    accept = {p["question"]: list(p["accept"]) for p in spec.stop_probes or []}
    extra = [spec.target] if spec.target else []
    return {i["question"]: accept.get(i["question"], []) + extra for i in spec.forget_qa}


def _retain_pairs(spec: TrainJobSpec, recipe: Any, model: Any, tokenizer: Any, eot: str,
                  rank: int, world: int) -> list[tuple[str | None, str]]:
    """This rank's share of the retain data: the ticket's, or the model's own answers
    (to the spec's retain prompts, else the shipped generic ones)."""
    if spec.retain_qa or spec.retain_texts:
        given: list[tuple[str | None, str]] = (
            [(i["question"], i["answer"] + eot) for i in spec.retain_qa or []]
            + [(None, t) for t in spec.retain_texts or []])
        return shard_for_rank(given, rank, world)
    from workers.evaluation.probes import load_retain_prompts

    own = spec.retain_prompts or list(load_retain_prompts())[:recipe.retain_prompts]
    prompts = shard_for_rank(own, rank, world)
    pairs = self_generated_retain(model=model, tokenizer=tokenizer, prompts=prompts,
                                  max_new_tokens=recipe.retain_max_new_tokens,
                                  cache_dir=Path(spec.data_dir) / "retain-cache",
                                  model_key=_model_key(spec))
    # Never empty: under ZeRO-3 every rank must run the same forwards (each one gathers
    # parameters collectively), so a rank whose few prompts all mention the target keeps
    # them rather than skipping its retain forward.
    return list(drop_mentions(pairs, spec.target)) or list(pairs)


def _model_key(spec: TrainJobSpec) -> str:
    """Identifies the model that generated the retain answers: base + parent adapter."""
    if not spec.merged_parent:
        return spec.base_model_sha256
    import hashlib

    from workers.training.lora_stack import ADAPTER_WEIGHTS

    weights = Path(spec.merged_parent) / ADAPTER_WEIGHTS
    return f"{spec.base_model_sha256}+{hashlib.sha256(weights.read_bytes()).hexdigest()}"


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _key(pair: tuple[str | None, str]) -> str:
    return f"{pair[0]}\x00{pair[1]}"


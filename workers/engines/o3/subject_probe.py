"""The subject probe: does the base model itself say that a prompt is about the target?

The prompt is asked again with a question appended ("Who is this question about? Reply
with just the name.") and the score is the base model's mean log-probability of the
request's target name as the reply. It uses what the model knows: a rephrased question
("Which equation relates mass and energy?") or one about the target's work is named after
the target, while a question about a neighbour in the same field (Bohr, Hawking) is named
after that neighbour. Mean-pooled hidden states (the contrastive detector) see the topic,
and topic is what target and neighbours share.

Measured on the bundled SmolLM2 (10 people, held-out rephrased / fill-in-the-blank /
adversarial probes; benchmarks/detector_auroc.py): AUROC against the unrelated questions
0.99-1.00, against all neighbours' questions 0.91-1.00 (the contrastive detector: 0.90-0.93
and 0.36-0.86).

Cost at serving: one forward, on a branch of the detection forward's cache, over the
question and the reply header (about 20 tokens); it gives every name's first token, which
bounds the name's score, so a name that cannot pass its probe's w_low is never run (exact:
its weight is 0 either way). Only names still open get a second forward, all in one
sequence under a block mask; the prompt itself is not run again. Measured on the bundled
SmolLM2 (benchmarks/serve_gating.py, 48 unrelated prompts, CPU): 10 gated requests cost
1.10x the O3 path with no blocks (1.22x with every name run, 1.43x with one forward each).
Training-free:
fitting it is only its calibration, from the generic prompts' scores (w = 0 up to a high
quantile of them) and the ticket's own questions' (w = 1 from the middle of the way to
their median on).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

PROBE_FILE = "subject_probe.json"
SUBJECT_QUESTION = "\n\nWho is this question about? Reply with just the name."


@dataclass
class SubjectProbe:
    """One request's subject probe: its target's name and calibration (scores are mean
    log-probabilities of the name's tokens)."""

    subject: str
    w_low: float      # score at and below which w = 0
    w_high: float     # ... at and above which w = 1
    question: str = SUBJECT_QUESTION

    def weight_from_score(self, scores: Tensor) -> Tensor:
        return ((scores - self.w_low) / max(self.w_high - self.w_low, 1e-6)).clamp(0.0, 1.0)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROBE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> SubjectProbe | None:
        path = directory / PROBE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def reply_tokens(tokenizer: Any, subjects: Sequence[str], *,
                 question: str = SUBJECT_QUESTION) -> tuple[list[int], list[list[int]]]:
    """What follows a prompt's text when it is scored: the question and the template's
    reply header (`tail`), then each subject's name as the reply's first words (chat
    models start a reply without a leading space). Tokenised once per servable or call."""
    from workers.engines.o3.detector import template_span
    from workers.model import format_chat

    header = tokenizer(format_chat(tokenizer, "x"), add_special_tokens=False)["input_ids"]
    tail = (tokenizer(question, add_special_tokens=False)["input_ids"]
            + header[len(header) - template_span(tokenizer).suffix:])
    names = [tokenizer(s.strip(), add_special_tokens=False)["input_ids"] for s in subjects]
    return tail, names


@torch.no_grad()
def subject_scores(model: Any, tokenizer: Any, prompts: Sequence[str],
                   subjects: Sequence[str], *, question: str = SUBJECT_QUESTION,
                   batch_size: int = 16) -> Tensor:
    """(len(prompts), len(subjects)) mean log p of each subject's name as the reply to the
    prompt with `question` appended: the chat-formatted prompt up to the end of the user's
    text, then `scores_after_prompt`."""
    from workers.engines.o3.detector import encode_prompts, padded_positions, template_span

    device = next(model.parameters()).device
    suffix = template_span(tokenizer).suffix
    tail, names = reply_tokens(tokenizer, subjects, question=question)
    rows: list[Tensor] = []
    for start in range(0, len(prompts), batch_size):
        enc = encode_prompts(tokenizer, list(prompts[start:start + batch_size]), device)
        end = enc["input_ids"].shape[1] - suffix          # where every row's text ends
        attn = enc["attention_mask"][:, :end]
        out = model(input_ids=enc["input_ids"][:, :end], attention_mask=attn,
                    position_ids=padded_positions(attn), use_cache=True, logits_to_keep=1)
        rows.append(scores_after_prompt(model, out.cache, attn, tail, names).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, len(subjects))


@torch.no_grad()
def scores_after_prompt(model: Any, cache: Any, attn: Tensor, tail: list[int],
                        names: list[list[int]], *, floor: Tensor | None = None) -> Tensor:
    """(B, len(names)) from `cache`, the KV cache of B left-padded chat prompts up to the
    end of the user's text (mask `attn`; the cache may hold more positions: they are cut).

    A forward over `tail` (reply_tokens) gives every name's first token at once. A name's
    score is the mean over its n tokens of log-probabilities <= 0, so it is at most its
    first token's log-probability / n: where that bound is at or below `floor` (per name;
    serving passes the score below which the weight is 0) the bound is returned and the
    rest of the name is never run. That is what unrelated traffic costs: the tail only.
    Otherwise a second forward over the names that are still open, all in one sequence:
    each name sees the prompt, the tail and its own earlier tokens (a block mask), and
    each name's positions restart where the tail ends, so every name is scored exactly
    as if it alone followed the tail. Serving passes its detection forward's cache: the
    prompt itself is never run again."""
    from workers.engines.o3.detector import padded_positions
    from workers.model.shared_prefix import branch_cache

    device = attn.device
    batch, end = attn.shape
    dtype = next(model.parameters()).dtype
    start = padded_positions(attn)[:, -1:] + 1                             # after the prompt
    tail_cache = branch_cache(cache, end)
    out = model(input_ids=torch.tensor(tail, device=device).expand(batch, -1),
                attention_mask=torch.cat([attn, attn.new_ones(batch, len(tail))], -1),
                position_ids=start + torch.arange(len(tail), device=device)[None],
                past_key_values=tail_cache, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)[
        :, torch.tensor([n[0] for n in names], device=device)]           # (B, len(names))
    lengths = torch.tensor([len(n) for n in names], device=device, dtype=first.dtype)
    scores = first / lengths
    open_ = [j for j, name in enumerate(names) if len(name) > 1
             and (floor is None or bool((scores[:, j] > floor[j]).any()))]
    if not open_:
        return scores
    ids, pos, owner = [], [], []
    for j in open_:
        ids += names[j][:-1]
        pos += range(len(tail), len(tail) + len(names[j]) - 1)
        owner += [j] * (len(names[j]) - 1)
    q = len(ids)
    # Query i sees key k (both new) only if k belongs to i's own name and comes before it;
    # every query sees the prompt and the whole tail.
    order = torch.arange(q, device=device)
    own = torch.tensor(owner, device=device)
    new_keys = (order[None, :] <= order[:, None]) & (own[None, :] == own[:, None])
    visible = torch.cat([attn.bool()[:, None, :].expand(batch, q, end),
                         torch.ones(batch, q, len(tail), dtype=torch.bool, device=device),
                         new_keys[None].expand(batch, q, q)], -1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]  # (B, 1, q, end+t+q)
    out = model(input_ids=torch.tensor(ids, device=device).expand(batch, -1),
                attention_mask=mask, position_ids=start + torch.tensor(pos, device=device)[None],
                past_key_values=out.past_key_values, use_cache=True)
    logp = torch.log_softmax(out.logits.float(), -1)                        # (B, q, V)
    offset = 0
    for j in open_:
        rest = names[j][1:]
        picked = logp[:, offset:offset + len(rest)].gather(
            -1, torch.tensor(rest, device=device).expand(batch, -1)[..., None])[..., 0]
        scores[:, j] = (first[:, j] + picked.sum(-1)) / len(names[j])
        offset += len(rest)
    return scores


def calibrate(subject: str, generic_scores: Tensor, forget_scores: Tensor, *,
              generic_quantile: float = 0.95) -> tuple[SubjectProbe, dict[str, float]]:
    """A probe for `subject` from its scores: w = 0 up to the `generic_quantile` of the
    generic prompts' scores, 1 from halfway between that and the median of the ticket's own
    questions' scores (these are not trained on: the probe has no parameters)."""
    g, f = generic_scores, forget_scores
    w_low = float(torch.quantile(g, generic_quantile))
    w_high = max(w_low + 0.5 * (float(f.median()) - w_low), w_low + 1e-3)
    probe = SubjectProbe(subject=subject, w_low=w_low, w_high=w_high)
    summary = {"generic_score_max": float(g.max()), "forget_score_median": float(f.median()),
               "forget_gated_share": float((probe.weight_from_score(f) > 0).float().mean()),
               "generic_gated_share": float((probe.weight_from_score(g) > 0).float().mean()),
               "w_low": w_low, "w_high": w_high}
    return probe, summary


def fit_subject_probe(model: Any, tokenizer: Any, *, subject: str,
                      forget_prompts: Sequence[str], generic_prompts: Sequence[str],
                      generic_quantile: float = 0.95) -> tuple[SubjectProbe, dict[str, float]]:
    """`calibrate` on the scores of `generic_prompts` and `forget_prompts`."""
    return calibrate(subject, subject_scores(model, tokenizer, generic_prompts, [subject])[:, 0],
                     subject_scores(model, tokenizer, forget_prompts, [subject])[:, 0],
                     generic_quantile=generic_quantile)

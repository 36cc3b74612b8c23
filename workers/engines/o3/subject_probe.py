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

Rivals. A small model names its field's best-known person for many questions about the
field ("Which Danish physicist proposed a model of the atom?" gets some of Einstein's
probability). A probe with `rivals` (well-known people, the lineage's other targets) adds
log P(target | the reply names the target or a rival) to its score: the target's mass is
its name's and its last name's probability as the reply, a rival's is bounded by the
probability of its first token (exact for the few rivals whose first token starts a form
of the target's name), all from the same two forwards. Measured on the bundled SmolLM2
(benchmarks/subject_gate.py, 10 targets, the neighbours' names left out of the rivals):
another target's probes gated (w > 0) 0.20 -> 0.15 of the time, the target's own held-out
probes at w >= 0.5 0.88 -> 0.91; neighbours unknown to the rivals list barely move.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
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
    rivals: list[str] = field(default_factory=list)  # empty: the name's own score only

    def weight_from_score(self, scores: Tensor) -> Tensor:
        return ((scores - self.w_low) / max(self.w_high - self.w_low, 1e-6)).clamp(0.0, 1.0)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PROBE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> SubjectProbe | None:
        path = directory / PROBE_FILE
        return cls(**json.loads(path.read_text())) if path.is_file() else None


@dataclass(frozen=True)
class NameTokens:
    """One probe's token sequences as replies (see `name_tokens`)."""

    name: tuple[int, ...]
    forms: tuple[tuple[int, ...], ...] = ()         # other forms of the name (its last word)
    exact_rivals: tuple[tuple[int, ...], ...] = ()  # rivals starting like a form: run whole
    rival_firsts: tuple[int, ...] = ()               # other rivals' first tokens (bounds)

    @property
    def weighed(self) -> bool:
        return bool(self.exact_rivals or self.rival_firsts)


def rivals_for(subject: str, candidates: Sequence[str]) -> list[str]:
    """The candidates that are other people than `subject`: not its name or a part of it
    ("Darwin", "Charles"), nor anyone of its surname (whose last name is the target's)."""
    def words(name: str) -> list[str]:
        return name.lower().replace("-", " ").split()

    own = words(subject)

    def other(candidate: str) -> bool:
        theirs = words(candidate)
        return bool(theirs) and theirs[-1] != own[-1] and not (
            set(theirs) <= set(own) or set(own) <= set(theirs))

    return list(dict.fromkeys(c.strip() for c in candidates if other(c)))


def name_tokens(tokenizer: Any, subject: str, rivals: Sequence[str] = ()) -> NameTokens:
    """The subject's name as the reply's first words (chat models start a reply without a
    leading space) and, when it is weighed against rivals, its last name alone and the
    rivals' full and last names."""
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])

    def with_last(name: str) -> list[str]:
        words = name.split()
        return [name] + ([words[-1]] if len(words) > 1 and len(words[-1]) > 3 else [])

    name = ids(subject)
    if not rivals:
        return NameTokens(name=name)
    forms = tuple(ids(f) for f in with_last(subject)[1:])
    starts = {name[0]} | {f[0] for f in forms}
    exact, firsts = [], []
    for rival in rivals:
        for form in map(ids, with_last(rival)):
            if form and form[0] in starts:
                exact.append(form)
            elif form:
                firsts.append(form[0])
    return NameTokens(name=name, forms=forms, exact_rivals=tuple(dict.fromkeys(exact)),
                      rival_firsts=tuple(sorted(set(firsts))))


def reply_tokens(tokenizer: Any, subjects: Sequence[str], *,
                 question: str = SUBJECT_QUESTION,
                 rivals: Sequence[Sequence[str]] | None = None
                 ) -> tuple[list[int], list[NameTokens]]:
    """What follows a prompt's text when it is scored: the question and the template's
    reply header (`tail`), then each subject's `name_tokens` (with `rivals[j]`, if given).
    Tokenised once per servable or call."""
    from workers.engines.o3.detector import template_span
    from workers.model import format_chat

    header = tokenizer(format_chat(tokenizer, "x"), add_special_tokens=False)["input_ids"]
    tail = (tokenizer(question, add_special_tokens=False)["input_ids"]
            + header[len(header) - template_span(tokenizer).suffix:])
    rivals = rivals if rivals is not None else [()] * len(subjects)
    return tail, [name_tokens(tokenizer, s, r) for s, r in zip(subjects, rivals)]


@torch.no_grad()
def subject_scores(model: Any, tokenizer: Any, prompts: Sequence[str],
                   subjects: Sequence[str], *, question: str = SUBJECT_QUESTION,
                   rivals: Sequence[Sequence[str]] | None = None,
                   batch_size: int = 16) -> Tensor:
    """(len(prompts), len(subjects)) probe scores of each subject (weighed against
    `rivals[j]` when given): the chat-formatted prompt up to the end of the user's text,
    then `scores_after_prompt`."""
    from workers.engines.o3.detector import encode_prompts, padded_positions, template_span

    device = next(model.parameters()).device
    suffix = template_span(tokenizer).suffix
    tail, names = reply_tokens(tokenizer, subjects, question=question, rivals=rivals)
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
                        names: Sequence[NameTokens | Sequence[int]], *,
                        floor: Tensor | None = None) -> Tensor:
    """(B, len(names)) from `cache`, the KV cache of B left-padded chat prompts up to the
    end of the user's text (mask `attn`; the cache may hold more positions: they are cut).

    A name's score is the mean over its n tokens of their log-probabilities as the reply,
    plus, for a name weighed against rivals, log P(name | name or a rival); both are
    <= 0, so the score is at most the first token's log-probability / n. A forward over
    `tail` (reply_tokens) gives every first token at once; where that bound is at or
    below `floor` (per name; serving passes the score below which the weight is 0) the
    bound is returned and the rest is never run. That is what unrelated traffic costs:
    the tail only. Otherwise a second forward over the sequences of the names still open
    (names, forms, exact rivals), all in one sequence: each sees the prompt, the tail and
    its own earlier tokens (a block mask) and its positions restart where the tail ends,
    so each is scored exactly as if it alone followed the tail. Serving passes its
    detection forward's cache: the prompt itself is never run again."""
    from workers.engines.o3.detector import padded_positions
    from workers.model.shared_prefix import branch_cache

    names = [n if isinstance(n, NameTokens) else NameTokens(name=tuple(n)) for n in names]
    device = attn.device
    batch, end = attn.shape
    dtype = next(model.parameters()).dtype
    start = padded_positions(attn)[:, -1:] + 1                             # after the prompt
    tail_cache = branch_cache(cache, end)
    out = model(input_ids=torch.tensor(tail, device=device).expand(batch, -1),
                attention_mask=torch.cat([attn, attn.new_ones(batch, len(tail))], -1),
                position_ids=start + torch.arange(len(tail), device=device)[None],
                past_key_values=tail_cache, use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)              # (B, V)
    scores = torch.stack([first[:, n.name[0]] / len(n.name) for n in names], -1)
    open_ = [j for j, n in enumerate(names) if (len(n.name) > 1 or n.weighed)
             and (floor is None or bool((scores[:, j] > floor[j]).any()))]
    if not open_:
        return scores
    seqs = list(dict.fromkeys(seq for j in open_ for seq in
                              (names[j].name, *names[j].forms, *names[j].exact_rivals)))
    long = [seq for seq in seqs if len(seq) > 1]
    totals = {seq: first[:, seq[0]] for seq in seqs}
    if long:
        ids, pos, owner = [], [], []
        for k, seq in enumerate(long):
            ids += seq[:-1]
            pos += range(len(tail), len(tail) + len(seq) - 1)
            owner += [k] * (len(seq) - 1)
        q = len(ids)
        # Query i sees key k (both new) only if k belongs to i's own sequence and comes
        # before it; every query sees the prompt and the whole tail.
        order = torch.arange(q, device=device)
        own = torch.tensor(owner, device=device)
        new_keys = (order[None, :] <= order[:, None]) & (own[None, :] == own[:, None])
        visible = torch.cat([attn.bool()[:, None, :].expand(batch, q, end),
                             torch.ones(batch, q, len(tail), dtype=torch.bool, device=device),
                             new_keys[None].expand(batch, q, q)], -1)
        mask = torch.zeros(visible.shape, dtype=dtype, device=device)
        mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]
        res = model(input_ids=torch.tensor(ids, device=device).expand(batch, -1),
                    attention_mask=mask,
                    position_ids=start + torch.tensor(pos, device=device)[None],
                    past_key_values=out.past_key_values, use_cache=True)
        logp = torch.log_softmax(res.logits.float(), -1)                    # (B, q, V)
        offset = 0
        for seq in long:
            rest = torch.tensor(seq[1:], device=device)
            picked = logp[:, offset:offset + len(rest)].gather(
                -1, rest.expand(batch, -1)[..., None])[..., 0]
            totals[seq] = totals[seq] + picked.sum(-1)
            offset += len(rest)
    for j in open_:
        n = names[j]
        scores[:, j] = totals[n.name] / len(n.name)
        if n.weighed:
            own = torch.logsumexp(torch.stack([totals[f] for f in (n.name, *n.forms)], -1), -1)
            rival = torch.logsumexp(torch.cat([first[:, list(n.rival_firsts)]]
                                              + [totals[r][:, None] for r in n.exact_rivals],
                                              -1), -1)
            scores[:, j] += own - torch.logaddexp(own, rival)
    return scores


def calibrate(subject: str, generic_scores: Tensor, forget_scores: Tensor, *,
              generic_quantile: float = 0.95, hard_scores: Tensor | None = None,
              rivals: Sequence[str] = ()) -> tuple[SubjectProbe, dict[str, float]]:
    """A probe for `subject` from its scores: w = 0 up to the `generic_quantile` of the
    generic prompts' scores, 1 from halfway between that and the median of the ticket's own
    questions' scores (these are not trained on: the probe has no parameters).

    With `hard_scores` (questions about other people), w = 0 also up to their
    `generic_quantile`, but never above that halfway point: w = 1 then starts halfway
    between the raised w_low and the median. `rivals`: what the scores were weighed
    against (the probe keeps them, to score the same way at serving)."""
    g, f = generic_scores, forget_scores
    median = float(f.median())
    w_low = float(torch.quantile(g, generic_quantile))
    if hard_scores is not None and len(hard_scores):
        w_low = max(w_low, min(float(torch.quantile(hard_scores, generic_quantile)),
                               w_low + 0.5 * (median - w_low)))
    w_high = max(w_low + 0.5 * (median - w_low), w_low + 1e-3)
    probe = SubjectProbe(subject=subject, w_low=w_low, w_high=w_high, rivals=list(rivals))
    summary = {"generic_score_max": float(g.max()), "forget_score_median": median,
               "forget_gated_share": float((probe.weight_from_score(f) > 0).float().mean()),
               "generic_gated_share": float((probe.weight_from_score(g) > 0).float().mean()),
               "w_low": w_low, "w_high": w_high}
    return probe, summary


def fit_subject_probe(model: Any, tokenizer: Any, *, subject: str,
                      forget_prompts: Sequence[str], generic_prompts: Sequence[str],
                      rivals: Sequence[str] = (), generic_quantile: float = 0.95
                      ) -> tuple[SubjectProbe, dict[str, float]]:
    """`calibrate` on the scores of `generic_prompts` and `forget_prompts` (weighed
    against `rivals`, which the probe keeps)."""
    def score(prompts: Sequence[str]) -> Tensor:
        return subject_scores(model, tokenizer, prompts, [subject], rivals=[rivals])[:, 0]

    return calibrate(subject, score(generic_prompts), score(forget_prompts),
                     generic_quantile=generic_quantile, rivals=rivals)

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
its weight is 0 either way). Then, only for the rows where some name is still open, one
forward over the names' remaining tokens and one over the exact rivals' (each all in one
sequence under a block mask); the prompt itself is not run again. Measured on the bundled
SmolLM2 with the 10 probes of a continual run (benchmarks/serve_version.py, a batch of 16
unrelated prompts, CPU): the tail 0.64 s, the names 1.17 s (every row: a name's first
token bounds its mean only loosely), the rivals 0.14 s (one row), next to 5.7 s for HF
generate of 32 tokens.
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
import re
from collections.abc import Mapping, Sequence
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


def name_forms(subject: str) -> list[str]:
    """How a text names `subject`: its full name, and its last word when that is a name of
    more than three letters ("Einstein", not "da" or "Bill")."""
    words = subject.split()
    return [subject] + ([words[-1]] if len(words) > 1 and len(words[-1]) > 3 else [])


def mentions(text: str, subject: str) -> bool:
    """Whether `text` names `subject` (a whole-word, case-insensitive `name_forms` match)."""
    return any(re.search(rf"\b{re.escape(form)}\b", text, re.IGNORECASE)
               for form in name_forms(subject))


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

    name = ids(subject)
    if not rivals:
        return NameTokens(name=name)
    forms = tuple(ids(f) for f in name_forms(subject)[1:])
    starts = {name[0]} | {f[0] for f in forms}
    exact, firsts = [], []
    for rival in rivals:
        for form in map(ids, name_forms(rival)):
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


def name_score(name: NameTokens, first: Tensor,
               totals: Mapping[tuple[int, ...], tuple[Tensor, Tensor]] | None = None
               ) -> Tensor:
    """`name`'s score over the rows of `first` (B, V), the reply's first-token
    log-probabilities, and `totals`: sequence -> ((B,) log-probability, (B,) exact?) of the
    sequences run so far. Exact once every sequence of the name is; before that an upper
    bound: a sequence's probability is at most its first token's (so the mean is at most
    first / n and the name's own mass at most its forms' first tokens'), and a rival not
    run yet adds no mass (its mass only lowers the score)."""
    totals = totals or {}

    def own(seq: tuple[int, ...]) -> Tensor:
        return totals[seq][0] if seq in totals else first[:, seq[0]]

    score = own(name.name) / len(name.name)
    if name.weighed:
        mine = torch.logsumexp(torch.stack([own(f) for f in (name.name, *name.forms)], -1), -1)
        rivals = [first[:, list(name.rival_firsts)]]
        for rival in name.exact_rivals:
            if len(rival) == 1:
                rivals.append(first[:, rival[0], None])
            elif rival in totals:
                value, exact = totals[rival]
                rivals.append(torch.where(exact, value, -torch.inf)[:, None])
        mass = torch.logsumexp(torch.cat(rivals, -1), -1)  # -inf when there is none
        score = score + mine - torch.logaddexp(mine, mass)
    return score


@torch.no_grad()
def scores_after_prompt(model: Any, cache: Any, attn: Tensor, tail: list[int],
                        names: Sequence[NameTokens | Sequence[int]], *,
                        floor: Tensor | None = None) -> Tensor:
    """(B, len(names)) from `cache`, the KV cache of B left-padded chat prompts up to the
    end of the user's text (mask `attn`; the cache may hold more positions: they are cut).

    A name's score is the mean over its n tokens of their log-probabilities as the reply,
    plus, for a name weighed against rivals, log P(name | name or a rival). A forward over
    `tail` (reply_tokens) gives every first token at once, and with them an upper bound of
    every score (`name_score`). Where a bound is at or below `floor` (per name; serving
    passes the score below which the weight is 0) the bound is returned: the weight is 0
    either way. That is what unrelated traffic costs: the tail only. The rest runs in two
    stages, each one forward over the rows where some name's bound still passes: first the
    names and their other forms (which make the bound tight but for the exact rivals),
    then the exact rivals of the names still open. Each forward puts its sequences in one:
    each sees the prompt, the tail and its own earlier tokens (a block mask) and its
    positions restart where the tail ends, so each is scored exactly as if it alone
    followed the tail. Serving passes its detection forward's cache: the prompt itself is
    never run again. With no `floor` every score is exact."""
    from workers.engines.o3.detector import padded_positions
    from workers.model.shared_prefix import branch_cache

    names = [n if isinstance(n, NameTokens) else NameTokens(name=tuple(n)) for n in names]
    device = attn.device
    batch, end = attn.shape
    start = padded_positions(attn)[:, -1:] + 1                             # after the prompt
    out = model(input_ids=torch.tensor(tail, device=device).expand(batch, -1),
                attention_mask=torch.cat([attn, attn.new_ones(batch, len(tail))], -1),
                position_ids=start + torch.arange(len(tail), device=device)[None],
                past_key_values=branch_cache(cache, end), use_cache=True, logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), -1)              # (B, V)
    totals: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def scores() -> Tensor:
        return torch.stack([name_score(n, first, totals) for n in names], -1)

    current = scores()
    stages = (lambda n: (n.name, *n.forms), lambda n: n.exact_rivals)
    for sequences_of in stages:
        todo = {j: [q for q in sequences_of(n) if len(q) > 1 and q not in totals]
                for j, n in enumerate(names)}
        open_ = [j for j, qs in todo.items() if qs]
        if floor is not None:
            open_ = [j for j in open_ if bool((current[:, j] > floor[j]).any())]
        if not open_:
            continue
        rows = (torch.arange(batch, device=device) if floor is None else
                (current[:, open_] > floor[open_]).any(1).nonzero().flatten())
        seqs = list(dict.fromkeys(q for j in open_ for q in todo[j]))
        rest = _rest_of_sequences(model, out.past_key_values, attn, start, len(tail),
                                  seqs, rows)
        for k, seq in enumerate(seqs):
            value, exact = first[:, seq[0]].clone(), torch.zeros(batch, dtype=torch.bool,
                                                                 device=device)
            value[rows] += rest[:, k]
            exact[rows] = True
            totals[seq] = (value, exact)
        current = scores()
    return current


def _rest_of_sequences(model: Any, past: Any, attn: Tensor, start: Tensor, tail_len: int,
                       seqs: Sequence[tuple[int, ...]], rows: Tensor) -> Tensor:
    """(len(rows), len(seqs)): each sequence's log-probability after its first token, as
    the reply after the tail (`past`, the cache over the prompts and the tail), for the
    batch `rows`; all sequences in one forward under a block mask."""
    from workers.model.shared_prefix import branch_cache

    device, dtype = attn.device, next(model.parameters()).dtype
    attn, start, batch, end = attn[rows], start[rows], len(rows), attn.shape[1]
    ids, pos, owner = [], [], []
    for k, seq in enumerate(seqs):
        ids += seq[:-1]
        pos += range(tail_len, tail_len + len(seq) - 1)
        owner += [k] * (len(seq) - 1)
    q = len(ids)
    # Query i sees key k (both new) only if k belongs to i's own sequence and comes before
    # it; every query sees the prompt and the whole tail.
    order = torch.arange(q, device=device)
    own = torch.tensor(owner, device=device)
    new_keys = (order[None, :] <= order[:, None]) & (own[None, :] == own[:, None])
    visible = torch.cat([attn.bool()[:, None, :].expand(batch, q, end),
                         torch.ones(batch, q, tail_len, dtype=torch.bool, device=device),
                         new_keys[None].expand(batch, q, q)], -1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~visible, torch.finfo(dtype).min)[:, None]
    res = model(input_ids=torch.tensor(ids, device=device).expand(batch, -1),
                attention_mask=mask, position_ids=start + torch.tensor(pos, device=device)[None],
                past_key_values=branch_cache(past, rows=rows), use_cache=True)
    logp = torch.log_softmax(res.logits.float(), -1)                        # (rows, q, V)
    nxt = torch.tensor([t for seq in seqs for t in seq[1:]], device=device)
    picked = logp.gather(-1, nxt.expand(batch, -1)[..., None])[..., 0]      # (rows, q)
    return torch.zeros(batch, len(seqs), device=device).index_add_(
        1, own, picked)


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

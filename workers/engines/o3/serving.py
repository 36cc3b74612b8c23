"""A loaded O3 version: detection on the prompt's forward, then gated greedy generation.

Per batch:
1. One forward of the base model over the prompts without their last token, keeping the
   hidden states (detector features) and the KV cache.
2. Each request's gate gives w_i per sample: its subject probe (subject_probe.py), which
   continues from that cache, or else its contrastive detector on the pooled features;
   weights at or below `skip_below` become exactly 0.
3. No block applies to any sample: generation continues from that cache, so the batch
   costs what the base model costs (plus the gates' cost). Otherwise the prompts of the
   rows some block applies to are run again with their blocks on (the cache of step 1 is
   the base model's), their rows of the cache are replaced, and the whole batch
   continues from it with the blocks applied per sample (gating.py): rows with w = 0 get
   exactly the base model, and only the ranks of blocks some row uses are computed.
4. The answer check (`confirm_by_name`): a subject probe's weight on a prompt that does
   not name its target (below 1 only, unless `confirm_full`) is held back in step 3; if
   the answer given without it names the target, that row is answered again with it on
   at w = 1 (its prompt run again with its blocks, as in step 3). The probe confuses some
   questions about a neighbour in the target's field with ones about the target; the
   answer the model gives to them names the neighbour, so the row keeps that answer. Streamed rows that wait for the check
   send their tokens once it is decided.

Both the Ray Serve deployment and offline evaluation call `generate`, so what is measured
is what is served.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from workers.engines.o3.detector import (
    Detector,
    content_mask,
    encode_prompts,
    padded_positions,
    template_span,
)
from workers.engines.o3.gating import gate_from_weights, hub_for, stacked_from_peft
from workers.engines.o3.subject_probe import (
    NameTokens,
    SubjectProbe,
    mentions,
    reply_tokens,
    scores_after_prompt,
)
from workers.model.token_stream import GenerateStreamer, RowTokens, TokenFn, eos_ids_of


class O3Servable:
    """Answers as an O3 version does (see module docstring)."""

    def __init__(self, *, model: Any, tokenizer: Any, device: str, detectors:
                 Sequence[Detector | None], ranks: Sequence[int], stacked: Any,
                 gating: Sequence[bool], skip_below: float = 0.02,
                 probes: Sequence[SubjectProbe | None] = (),
                 confirm: Sequence[bool] = (), confirm_full: Sequence[bool] = ()) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.detectors = list(detectors)
        # A block with a subject probe gates on it instead of its contrastive detector.
        self.probes = list(probes) or [None] * len(self.detectors)
        self._probe_tokens: tuple[list[Any], tuple[list[int], list[NameTokens]]] | None = None
        self.ranks = list(ranks)
        self.gating = list(gating)
        # Per block, the target whose naming confirms its weight (None: no check), and
        # whether a full weight waits for that too.
        self.confirm = [p.subject if p is not None and g and c else None
                        for p, g, c in zip(self.probes, self.gating,
                                           list(confirm) or [True] * len(self.detectors))]
        self.confirm_full = list(confirm_full) or [True] * len(self.detectors)
        self.skip_below = skip_below
        self._span = template_span(tokenizer)
        self._layers = sorted({i for d in self.detectors if d is not None for i in d.layers})
        self._hub = hub_for(model)
        self._key = f"o3-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self.last_weights: Tensor | None = None  # (batch, blocks) the gates gave, latest call
        self.last_applied: Tensor | None = None  # ... and what was applied after the check
        if stacked is not None:
            self._hub.add_version(self._key, stacked)

    @classmethod
    def load(cls, version_dir: Path | None, *, model: Any, tokenizer: Any, device: str,
             gating: bool | None = None, confirm_by_name: bool | None = None,
             confirm_full: bool | None = None) -> O3Servable:
        """From a version directory (None: the base model). `gating` False forces w = 1;
        `confirm_by_name` and `confirm_full` override each block's own settings of the
        answer check."""
        from workers.engines.o3.config import DetectorConfig
        from workers.engines.o3.engine import read_blocks
        from workers.training.lora_stack import read_adapter

        blocks = read_blocks(version_dir)
        stacked = None
        if blocks:
            assert version_dir is not None
            config, weights = read_adapter(Path(version_dir))
            stacked = stacked_from_peft(weights, config, [b.rank for b in blocks],
                                        device=device)
        detectors = [Detector.load(Path(version_dir) / b.detector) if b.detector else None
                     for b in blocks]  # type: ignore[operator]
        gates = [b.gating if gating is None else gating for b in blocks]
        skip = min([float((b.config or {}).get("detector", {}).get("skip_below",
                                                                    DetectorConfig.skip_below))
                    for b in blocks] or [DetectorConfig.skip_below])
        for det in detectors:
            if det is not None:
                _to(det, device)
        probes = [SubjectProbe.load(Path(version_dir) / b.detector) if b.detector else None
                  for b in blocks]  # type: ignore[operator]
        # Versions stored before the check existed get it too: it is how they are served.
        def setting(name: str, override: bool | None) -> list[bool]:
            return [bool((b.config or {}).get("detector", {}).get(
                name, getattr(DetectorConfig, name))) if override is None else override
                for b in blocks]

        return cls(model=model, tokenizer=tokenizer, device=device, detectors=detectors,
                   ranks=[b.rank for b in blocks], stacked=stacked, gating=gates,
                   skip_below=skip, probes=probes,
                   confirm=setting("confirm_by_name", confirm_by_name),
                   confirm_full=setting("confirm_full", confirm_full))

    def close(self) -> None:
        self._hub.remove_version(self._key)

    def _reply_tokens(self, probed: list[SubjectProbe]) -> tuple[list[int], list[NameTokens]]:
        """The probes' tokens, tokenised on a version's first batch, not on each."""
        key = [(p.subject, tuple(p.rivals)) for p in probed]
        if self._probe_tokens is None or self._probe_tokens[0] != key:
            self._probe_tokens = (key, reply_tokens(self.tokenizer, [p.subject for p in probed],
                                                    rivals=[p.rivals for p in probed]))
        return self._probe_tokens[1]

    # -- detection ------------------------------------------------------------------------

    def _weights(self, hidden: Sequence[Tensor], mask: Tensor, cache: Any, attn: Tensor
                 ) -> Tensor:
        """(batch, blocks) w_i per sample, from the detection forward: its hidden states
        (contrastive detectors) and its cache `cache` over the prompt tokens of `attn`
        (subject probes continue from it)."""
        batch = mask.shape[0]
        if not self.detectors:
            return torch.zeros(batch, 0)
        probed = [(i, p) for i, (p, g) in enumerate(zip(self.probes, self.gating))
                  if p is not None and g]
        subject: dict[int, Tensor] = {}
        if probed:
            tail, names = self._reply_tokens([p for _, p in probed])
            # w = 0 at and below w_low, so a name whose score cannot exceed it is not run.
            floor = torch.tensor([p.w_low for _, p in probed], device=attn.device)
            scores = scores_after_prompt(self.model, cache,
                                         attn[:, :attn.shape[1] - self._span.suffix],
                                         tail, names, floor=floor)
            subject = {i: p.weight_from_score(scores[:, n]) for n, (i, p) in enumerate(probed)}
        cols = []
        for i, (det, gated) in enumerate(zip(self.detectors, self.gating)):
            if i in subject:
                cols.append(subject[i])
            elif det is None or not gated:
                cols.append(torch.ones(batch, device=mask.device))
            else:
                cols.append(det.weights(det.features(hidden, mask)))
        w = torch.stack(cols, -1).float()
        # Per sample, so that a sample's answer never depends on the rest of its batch.
        return torch.where(w <= self.skip_below, torch.zeros_like(w), w)

    @torch.no_grad()
    def block_weights(self, prompts: list[str]) -> Tensor:
        """(batch, blocks) w_i for each prompt (what generate would apply)."""
        enc = encode_prompts(self.tokenizer, prompts, self.device)
        width = enc["input_ids"].shape[1] - 1
        attn = enc["attention_mask"]
        out = self.model(input_ids=enc["input_ids"][:, :width], attention_mask=attn[:, :width],
                         position_ids=padded_positions(attn)[:, :width],
                         output_hidden_states=True, use_cache=True, logits_to_keep=1)
        mask = content_mask(attn, self._span, width=width)
        return self._weights(out.hidden_states, mask, out.cache, attn).cpu()

    def _unconfirmed(self, prompts: Sequence[str], w: Tensor) -> Tensor:
        """(batch, blocks): the weights that wait for the answer's check (see module
        docstring): a confirming block's weight (below 1 unless `confirm_full`) on a
        prompt that does not name its target."""
        out = torch.zeros_like(w, dtype=torch.bool)
        full = torch.tensor(self.confirm_full, dtype=torch.bool, device=w.device)
        for row, i in ((w > 0) & ((w < 1) | full)).nonzero().tolist():
            subject = self.confirm[i]
            out[row, i] = subject is not None and not mentions(prompts[row], subject)
        return out

    # -- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_token: TokenFn | None = None) -> list[str]:
        if len(prompts) != len(max_new_tokens):
            raise ValueError("one max_new_tokens per prompt")
        if not prompts:
            return []
        enc = encode_prompts(self.tokenizer, prompts, self.device)
        ids, attn = enc["input_ids"], enc["attention_mask"]
        width = ids.shape[1] - 1
        with self._hub.lock, self._lock:
            was_training = self.model.training
            self.model.eval()
            try:
                # generate()'s positions: generation continues from this cache, and keys
                # cached at other positions would skew every left-padded row.
                pre = self.model(input_ids=ids[:, :width], attention_mask=attn[:, :width],
                                 position_ids=padded_positions(attn)[:, :width],
                                 output_hidden_states=bool(self._layers),
                                 use_cache=True, logits_to_keep=1)
                mask = content_mask(attn, self._span, width=width)
                w = self._weights(pre.hidden_states or (), mask, pre.cache, attn)
                self.last_weights = w.cpu()
                waiting = self._unconfirmed(prompts, w)
                applied = w.masked_fill(waiting, 0.0)
                stream = _HeldStream(on_token, waiting.any(1).tolist()) if on_token else None
                texts = self._decode(ids, attn, pre.past_key_values, applied, max_new_tokens,
                                     stream.first_pass if stream else None)
                named = torch.zeros_like(waiting)
                for row, i in waiting.nonzero().tolist():
                    named[row, i] = mentions(texts[row], self.confirm[i])
                again = named.any(1).nonzero().flatten().tolist()
                if again:
                    # The answer settles the doubt the weight expressed: it is about the
                    # target, so the block applies in full.
                    applied[again] = w[again].masked_fill(waiting[again] & ~named[again],
                                                          0.0).masked_fill(named[again], 1.0)
                    redo = self._decode(ids[again], attn[again], None, applied[again],
                                        [max_new_tokens[r] for r in again],
                                        stream.second_pass(again) if stream else None)
                    for r, text in zip(again, redo):
                        texts[r] = text
                if stream:
                    stream.release(set(again))
                self.last_applied = applied.cpu()
            finally:
                if was_training:
                    self.model.train()
        return texts

    def _decode(self, ids: Tensor, attn: Tensor, cache: Any, w: Tensor,
                max_new_tokens: list[int], on_token: TokenFn | None) -> list[str]:
        """Greedy answers of the rows of `ids` with the blocks applied per sample by `w`,
        continuing from `cache` (the detection forward's, over all but the last prompt
        token; None: every row's prompt is run here, with its blocks on)."""
        tok = self.tokenizer
        width = ids.shape[1] - 1
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(max_new_tokens), "do_sample": False,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
        if on_token is not None:
            rows = RowTokens(on_token, max_new_tokens, eos_ids_of(self.model, tok))
            kwargs["streamer"] = GenerateStreamer(rows)
        gated = (w > 0).any(1).nonzero().flatten().to(ids.device)
        if not len(gated):
            out = self.model.generate(input_ids=ids, attention_mask=attn,
                                      past_key_values=cache, **kwargs)
        else:
            gate = gate_from_weights(w, self.ranks).to(ids.device)
            rerun = gated if cache is not None else torch.arange(len(ids), device=ids.device)
            # Only the gated rows' prompts are run again (with their blocks on); the other
            # rows keep the detection forward's cache, which is theirs.
            with self._hub.active(self._key, gate[rerun]):
                again = self.model(input_ids=ids[rerun, :width],
                                   attention_mask=attn[rerun, :width],
                                   position_ids=padded_positions(attn)[rerun, :width],
                                   use_cache=True, logits_to_keep=1)
            if cache is None:
                cache = again.past_key_values
            else:
                for mine, theirs in zip(cache.layers, again.cache.layers):
                    mine.keys[gated], mine.values[gated] = theirs.keys, theirs.values
            with self._hub.active(self._key, gate):
                out = self.model.generate(input_ids=ids, attention_mask=attn,
                                          past_key_values=cache, **kwargs)
        new = out[:, ids.shape[1]:]
        return [tok.decode(row[:n], skip_special_tokens=True).strip()
                for row, n in zip(new, max_new_tokens)]


class _HeldStream:
    """`on_token` for a batch whose `held` rows wait for the answer check: their first
    pass's tokens are kept back, then either sent (`release`) or replaced by the second
    pass's, streamed as they come; the other rows stream at once."""

    def __init__(self, on_token: TokenFn, held: list[bool]) -> None:
        self._on_token = on_token
        self._kept: dict[int, list[int]] = {r: [] for r, h in enumerate(held) if h}

    def first_pass(self, row: int, token: int) -> None:
        if row in self._kept:
            self._kept[row].append(token)
        else:
            self._on_token(row, token)

    def second_pass(self, rows: list[int]) -> TokenFn:
        return lambda index, token: self._on_token(rows[index], token)

    def release(self, replaced: set[int]) -> None:
        for row, tokens in self._kept.items():
            if row not in replaced:
                for token in tokens:
                    self._on_token(row, token)


def _to(det: Detector, device: Any) -> None:
    for name in ("feat_mean", "feat_std", "proj", "forget_z", "maha_mean", "maha_prec",
                 "score_mean", "score_std", "agg_coef"):
        setattr(det, name, getattr(det, name).to(device))

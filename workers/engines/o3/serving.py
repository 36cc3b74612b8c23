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
    reply_tokens,
    scores_after_prompt,
)
from workers.model.token_stream import GenerateStreamer, RowTokens, TokenFn, eos_ids_of


class O3Servable:
    """Answers as an O3 version does (see module docstring)."""

    def __init__(self, *, model: Any, tokenizer: Any, device: str, detectors:
                 Sequence[Detector | None], ranks: Sequence[int], stacked: Any,
                 gating: Sequence[bool], skip_below: float = 0.02,
                 probes: Sequence[SubjectProbe | None] = ()) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.detectors = list(detectors)
        # A block with a subject probe gates on it instead of its contrastive detector.
        self.probes = list(probes) or [None] * len(self.detectors)
        self._probe_tokens: tuple[list[Any], tuple[list[int], list[NameTokens]]] | None = None
        self.ranks = list(ranks)
        self.gating = list(gating)
        self.skip_below = skip_below
        self._span = template_span(tokenizer)
        self._layers = sorted({i for d in self.detectors if d is not None for i in d.layers})
        self._hub = hub_for(model)
        self._key = f"o3-{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self.last_weights: Tensor | None = None  # (batch, blocks) of the latest call
        if stacked is not None:
            self._hub.add_version(self._key, stacked)

    @classmethod
    def load(cls, version_dir: Path | None, *, model: Any, tokenizer: Any, device: str,
             gating: bool | None = None) -> O3Servable:
        """From a version directory (None: the base model). `gating` False forces w = 1."""
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
        return cls(model=model, tokenizer=tokenizer, device=device, detectors=detectors,
                   ranks=[b.rank for b in blocks], stacked=stacked, gating=gates,
                   skip_below=skip, probes=probes)

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

    # -- generation -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_token: TokenFn | None = None) -> list[str]:
        if len(prompts) != len(max_new_tokens):
            raise ValueError("one max_new_tokens per prompt")
        if not prompts:
            return []
        tok = self.tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        enc = encode_prompts(tok, prompts, self.device)
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
                kwargs = {"max_new_tokens": max(max_new_tokens), "do_sample": False,
                          "pad_token_id": pad_id}
                if on_token is not None:
                    rows = RowTokens(on_token, max_new_tokens, eos_ids_of(self.model, tok))
                    kwargs["streamer"] = GenerateStreamer(rows)
                gated = (w > 0).any(1).nonzero().flatten().to(ids.device)
                if not len(gated):
                    out = self.model.generate(input_ids=ids, attention_mask=attn,
                                              past_key_values=pre.past_key_values, **kwargs)
                else:
                    gate = gate_from_weights(w, self.ranks).to(ids.device)
                    # Only the gated rows' prompts are run again (with their blocks on);
                    # the other rows keep the detection forward's cache, which is theirs.
                    with self._hub.active(self._key, gate[gated]):
                        again = self.model(input_ids=ids[gated, :width],
                                           attention_mask=attn[gated, :width],
                                           position_ids=padded_positions(attn)[gated, :width],
                                           use_cache=True, logits_to_keep=1)
                    for mine, theirs in zip(pre.past_key_values.layers, again.cache.layers):
                        mine.keys[gated], mine.values[gated] = theirs.keys, theirs.values
                    with self._hub.active(self._key, gate):
                        out = self.model.generate(input_ids=ids, attention_mask=attn,
                                                  past_key_values=pre.past_key_values, **kwargs)
            finally:
                if was_training:
                    self.model.train()
        new = out[:, ids.shape[1]:]
        return [tok.decode(row[:n], skip_special_tokens=True).strip()
                for row, n in zip(new, max_new_tokens)]


def _to(det: Detector, device: Any) -> None:
    for name in ("feat_mean", "feat_std", "proj", "forget_z", "maha_mean", "maha_prec",
                 "score_mean", "score_std", "agg_coef"):
        setattr(det, name, getattr(det, name).to(device))

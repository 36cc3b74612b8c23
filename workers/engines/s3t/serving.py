"""Serving an S3T version: per shard its longest surviving prefix, the shards averaged.

Each shard's LoRA groups are applied with forward hooks on the base model's projections
(out += scale * B(A(x)), exactly PEFT's LoRA forward), added for that shard's forward and
removed right after; the base model itself is never modified, so one loaded base serves
any number of versions and shards. Generation is batched and greedy: at every step each
active shard runs one forward on its own KV cache, the next token is the argmax of the
mean of their probabilities (or of their logits, the paper's choice: `aggregate`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workers.engines.s3t.training import read_group

if TYPE_CHECKING:
    from workers.model.token_stream import TokenFn


@dataclass
class ShardLoRA:
    """One shard's active groups: module name -> (A (r, in), B (out, r)), and the scale."""

    shard: int
    modules: dict[str, tuple[Any, Any]]
    scale: float


def shard_lora(shard: int, groups: Sequence[dict[str, Any]], *, r: int, alpha: int) -> ShardLoRA:
    modules: dict[str, tuple[Any, Any]] = {}
    for weights in groups:
        for key, a in weights.items():
            if ".lora_A." not in key:
                continue
            # "base_model.model.<module path>.lora_A.weight" -> "<module path>"
            name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            modules[name] = (a, weights[key.replace(".lora_A.", ".lora_B.")])
    return ShardLoRA(shard=shard, modules=modules, scale=alpha / r)


def load_shards(manifest: dict[str, Any], fetch: Any) -> list[ShardLoRA]:
    from workers.engines.s3t.plan import serving_choice

    cfg = manifest["config"]
    out = []
    for shard, prefixes in serving_choice(manifest):
        groups = [read_group(fetch(p["object_key"])) for p in prefixes]
        out.append(shard_lora(shard, groups, r=cfg["lora_r"], alpha=cfg["lora_alpha"]))
    return out


AGGREGATES = ("logits", "probs")


def combine(per_shard: Sequence[Any], aggregate: str) -> Any:
    """The ensemble's scores from each shard's logits (..., vocab); argmax is the answer.

    "logits": the mean of the logits (= of the log-probabilities, up to a constant: a
    geometric mean of the shards' distributions). "probs": the log of the mean of the
    probabilities (an arithmetic mean), under which one shard that knows an answer
    outvotes shards that merely guess.
    """
    import math

    import torch

    stacked = torch.stack(list(per_shard))
    if aggregate == "logits":
        return stacked.mean(0)
    if aggregate == "probs":
        return torch.logsumexp(torch.log_softmax(stacked, -1), 0) - math.log(len(per_shard))
    raise ValueError(f"unknown aggregate {aggregate!r}; use one of {AGGREGATES}")


class S3TServable:
    """Answers as the ensemble of `shards` (the base model alone when there are none)."""

    def __init__(self, model: Any, tokenizer: Any, *, device: str,
                 shards: Sequence[ShardLoRA], aggregate: str = "logits") -> None:
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; use one of {AGGREGATES}")
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.aggregate = aggregate
        self.shards = list(shards)
        param = next(model.parameters())
        for shard in self.shards:  # weights onto the model's device, once
            shard.modules = {n: (a.to(param.device), b.to(param.device))
                             for n, (a, b) in shard.modules.items()}
        # Hooks are model state while a forward runs: one forward pass at a time.
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def _applied(self, shard: ShardLoRA | None) -> Iterator[None]:
        if shard is None:
            yield
            return
        handles = []
        for name, (a, b) in shard.modules.items():
            module = self.model.get_submodule(name)

            def hook(_mod: Any, inputs: Any, output: Any, a: Any = a, b: Any = b) -> Any:
                x = inputs[0].to(a.dtype)
                return output + ((x @ a.T) @ b.T * shard.scale).to(output.dtype)

            handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _members(self) -> list[ShardLoRA | None]:
        return list(self.shards) if self.shards else [None]

    def _encode(self, prompts: Sequence[str]) -> Any:
        from workers.model import format_chat

        tok = self.tokenizer
        side, tok.padding_side = tok.padding_side, "left"  # prompts end where answers start
        try:
            return tok([format_chat(tok, p) for p in prompts], return_tensors="pt",
                       padding=True, add_special_tokens=False).to(self.device)
        finally:
            tok.padding_side = side

    def next_token_logits(self, prompts: Sequence[str]) -> Any:
        """(batch, vocab) mean over the active shards of the logits of the first answer token."""
        import torch

        enc = self._encode(prompts)
        positions = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        outs = []
        with self._lock, torch.no_grad():
            for shard in self._members():
                with self._applied(shard):
                    out = self.model(input_ids=enc["input_ids"],
                                     attention_mask=enc["attention_mask"],
                                     position_ids=positions, use_cache=False)
                outs.append(out.logits[:, -1].float())
        return combine(outs, self.aggregate)

    def sequence_logits(self, input_ids: Any, attention_mask: Any) -> Any:
        """(batch, seq, vocab) ensemble scores over the active shards (right-padded)."""
        import torch

        outs = []
        with self._lock, torch.no_grad():
            for shard in self._members():
                with self._applied(shard):
                    outs.append(self.model(input_ids=input_ids.to(self.device),
                                           attention_mask=attention_mask.to(self.device),
                                           use_cache=False).logits.float())
        return combine(outs, self.aggregate)

    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_token: TokenFn | None = None) -> list[str]:
        import torch

        from workers.model.token_stream import RowTokens

        if not prompts:
            return []
        tok = self.tokenizer
        eos = tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        enc = self._encode(prompts)
        mask = enc["attention_mask"]
        step_ids = enc["input_ids"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        members = self._members()
        caches: list[Any] = [None] * len(members)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=mask.device)
        generated: list[Any] = []
        rows = RowTokens(on_token, max_new_tokens, [eos]) if on_token is not None else None
        with self._lock, torch.no_grad():
            for _ in range(max(max_new_tokens)):
                outs = []
                for i, shard in enumerate(members):
                    with self._applied(shard):
                        out = self.model(input_ids=step_ids, attention_mask=mask,
                                         position_ids=positions, past_key_values=caches[i],
                                         use_cache=True)
                    caches[i] = out.past_key_values
                    outs.append(out.logits[:, -1].float())
                next_ids = combine(outs, self.aggregate).argmax(-1)
                next_ids = torch.where(done, torch.full_like(next_ids, pad), next_ids)
                generated.append(next_ids)
                if rows is not None:
                    rows.step(next_ids.tolist())
                done |= next_ids == eos
                if bool(done.all()):
                    break
                step_ids = next_ids[:, None]
                mask = torch.cat([mask, torch.ones_like(step_ids)], dim=-1)
                positions = positions[:, -1:] + 1
        rows = torch.stack(generated, dim=1) if generated else torch.empty(len(prompts), 0)
        return [tok.decode(row[:n], skip_special_tokens=True).strip()
                for row, n in zip(rows, max_new_tokens)]

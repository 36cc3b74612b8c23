"""Token log-probabilities of texts under a Hugging Face causal LM, as a `ScoreFn`.

Membership inference (Min-K%, Min-K%++, loss) and answer perplexity need, for each scored
token, its log-probability and the mean / spread of log-probabilities under the model's
next-token distribution at that position. torch is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenStats:
    """Per scored token: log p(x_t), E_z[log p(z)] and sqrt(Var_z[log p(z)]) at t."""

    logps: list[float]
    means: list[float]
    stds: list[float]


ScoreFn = Callable[[list[tuple[str | None, str]]], list[TokenStats]]
"""(prompt or None, text) pairs -> stats of the text's tokens (chat-formatted prompt
context; None scores a plain text on its own)."""


def hf_score_fn(model: Any, tokenizer: Any, *, batch_size: int = 4,
                max_tokens: int = 256) -> ScoreFn:
    """A `ScoreFn` over a loaded model (a PEFT-wrapped one scores with its adapter on)."""

    def score(pairs: list[tuple[str | None, str]]) -> list[TokenStats]:
        return token_stats(model, tokenizer, pairs, batch_size=batch_size,
                           max_tokens=max_tokens)

    return score


def token_stats(model: Any, tokenizer: Any, pairs: Sequence[tuple[str | None, str]], *,
                batch_size: int = 4, max_tokens: int = 256) -> list[TokenStats]:
    import torch

    from workers.training.data import IGNORE, encode_pairs
    from workers.training.losses import shifted_logits_and_labels

    was_training = model.training
    model.eval()
    out: list[TokenStats] = []
    try:
        for start in range(0, len(pairs), batch_size):
            chunk = list(pairs[start:start + batch_size])
            batch = encode_pairs(tokenizer, chunk, max_tokens=max_tokens)
            device = next(model.parameters()).device
            batch.input_ids = batch.input_ids.to(device)
            batch.attention_mask = batch.attention_mask.to(device)
            batch.labels = batch.labels.to(device)
            with torch.no_grad():
                logits, labels = shifted_logits_and_labels(model, batch)  # (B,T-1,V), (B,T-1)
                logp = torch.log_softmax(logits, -1)
                probs = logp.exp()
                mean = (probs * logp).sum(-1)                                  # (B, T-1)
                std = ((probs * (logp - mean.unsqueeze(-1)) ** 2).sum(-1)).clamp(min=0).sqrt()
                token = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            mask = labels != IGNORE
            for row in range(labels.shape[0]):
                keep = mask[row]
                out.append(TokenStats(token[row][keep].tolist(), mean[row][keep].tolist(),
                                      std[row][keep].tolist()))
    finally:
        if was_training:
            model.train()
    return out

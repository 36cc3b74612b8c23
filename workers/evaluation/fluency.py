"""Fluency of generated answers: unlearning must not leave gibberish behind.

- answer perplexity: exp of the mean negative log-probability of the generated answer
  under a *reference* model (the base), given the prompt. Gibberish and broken grammar
  get a high perplexity; a fluent refusal gets a low one.
- repetition rate ("rep-n", Welleck et al., 2019): the share of an answer's word n-grams
  that repeat an earlier n-gram of the same answer; degenerate loops ("the the the")
  score near 1, ordinary sentences 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from workers.evaluation.rouge import words


def perplexity(token_logps: Sequence[float]) -> float:
    """exp(-mean log p) of the scored tokens (natural log)."""
    if not token_logps:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(-sum(token_logps) / len(token_logps))


def repetition_rate(text: str, n: int = 2) -> float:
    """1 - distinct n-grams / n-grams over the text's words (0.0 for fewer than n words)."""
    if n < 1:
        raise ValueError("n must be >= 1")
    tokens = words(text)
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def mean_repetition_rate(texts: Sequence[str], n: int = 2) -> float:
    """Mean `repetition_rate` over answers (0.0 for none)."""
    return sum(repetition_rate(t, n) for t in texts) / len(texts) if texts else 0.0

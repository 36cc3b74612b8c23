"""MUSE's memorisation metrics (Shi et al., 2024), scored with ROUGE-L recall.

- verbatim memorisation (VerbMem): prompt with the first part of each forget text and
  compare the model's continuation with the true rest;
- knowledge memorisation (KnowMem): ask questions about the forget set and compare the
  answers with the reference answers.
Both are means over items of ROUGE-L recall, in [0, 1]; lower after unlearning is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from workers.evaluation.rouge import rouge_l_recall, words

DEFAULT_PREFIX_FRACTION = 0.5
"""Share of a forget text's words given as the prompt; the rest is the reference."""


@dataclass(frozen=True)
class ContinuationProbe:
    """The first part of a forget text, and the rest it should (not) be continued with."""

    prefix: str
    reference: str


def continuation_probes(texts: Sequence[str], *, prefix_fraction: float = DEFAULT_PREFIX_FRACTION,
                        min_words: int = 6) -> list[ContinuationProbe]:
    """Split each forget text of at least `min_words` words into prefix + reference."""
    if not 0.0 < prefix_fraction < 1.0:
        raise ValueError("prefix_fraction must be in (0, 1)")
    probes = []
    for text in texts:
        parts = text.split()
        if len(words(text)) < min_words:
            continue
        cut = max(1, min(len(parts) - 1, int(len(parts) * prefix_fraction)))
        probes.append(ContinuationProbe(" ".join(parts[:cut]), " ".join(parts[cut:])))
    return probes


def _mean_recall(references: Sequence[str], outputs: Sequence[str]) -> float:
    if len(references) != len(outputs):
        raise ValueError(f"got {len(outputs)} outputs for {len(references)} references")
    if not references:
        raise ValueError("nothing to score")
    return sum(rouge_l_recall(r, o) for r, o in zip(references, outputs)) / len(references)


def verbatim_memorisation(references: Sequence[str], continuations: Sequence[str]) -> float:
    """VerbMem: mean ROUGE-L recall of the continuations against the true rest of each text."""
    return _mean_recall(references, continuations)


def knowledge_memorisation(reference_answers: Sequence[str], answers: Sequence[str]) -> float:
    """KnowMem: mean ROUGE-L recall of the answers against the reference answers."""
    return _mean_recall(reference_answers, answers)

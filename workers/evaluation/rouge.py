"""ROUGE-L (Lin, 2004): longest common subsequence of words between a reference and a candidate.

The unlearning papers score free-form answers with it: TOFU and RWKU report ROUGE-L
*recall* (how much of the reference answer the model still produces), MUSE scores verbatim
and knowledge memorisation with ROUGE-L of continuations and of QA answers. Pure Python,
no dependency: words are lower-cased runs of letters and digits, as rouge-score's default
tokenizer splits them (without stemming).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"[^\W_]+")


@dataclass(frozen=True)
class RougeScore:
    """precision = LCS / candidate words, recall = LCS / reference words, f1 their harmonic mean."""

    precision: float
    recall: float
    f1: float


def words(text: str) -> list[str]:
    """Lower-cased words (letters and digits; punctuation and underscores split them)."""
    return _WORD.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two word lists (O(len(a) * len(b)))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(reference: str, candidate: str) -> RougeScore:
    """ROUGE-L of `candidate` against `reference` (0 everywhere when either has no words)."""
    ref, cand = words(reference), words(candidate)
    lcs = lcs_length(ref, cand)
    if lcs == 0:
        return RougeScore(0.0, 0.0, 0.0)
    precision, recall = lcs / len(cand), lcs / len(ref)
    return RougeScore(precision, recall, 2 * precision * recall / (precision + recall))


def rouge_l_recall(reference: str, candidate: str) -> float:
    """The share of the reference's words the candidate reproduces in order (TOFU/RWKU)."""
    return rouge_l(reference, candidate).recall

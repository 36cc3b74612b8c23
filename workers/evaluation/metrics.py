"""Metrics on probe answers: did the model still answer correctly, relative to the base.

An answer counts as correct when the generated text contains any accepted keyword or alias
(case-insensitive, word-bounded), the QA check used by RWKU-style knowledge probes. Scores
are always read relative to the base model's own score on the same probes, because a small
model does not answer everything right to begin with (the ratios and the one promotion
verdict built on them are in workers.evaluation.report).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from workers.evaluation.probes import Probe

GenerateFn = Callable[[list[str]], list[str]]
"""Greedy answers for a batch of user prompts (chat formatting is the backend's job)."""
StopFn = Callable[[str], bool]
"""Given a row's answer so far, True once nothing later can change how it is judged."""


def _normalise(text: str) -> str:
    # Fold case and typographic variants so "Curie's" / "Curie’s" and "1,879" / "1879" match.
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    return re.sub(r"\s+", " ", text)


def is_correct(answer: str, *, accepted: Sequence[str]) -> bool:
    """True when `answer` contains one of the `accepted` keywords as whole words."""
    text = _normalise(answer)
    for keyword in accepted:
        key = _normalise(keyword).strip()
        if not key:
            continue
        # Word boundaries only where the keyword itself starts/ends with a word character,
        # so "7" does not match "17" but "H2O" or "Rome." still match as written.
        left = r"(?<!\w)" if key[0].isalnum() else ""
        right = r"(?!\w)" if key[-1].isalnum() else ""
        if re.search(left + re.escape(key) + right, text):
            return True
    return False


def decided_correct(answer_so_far: str, accepted: Sequence[str]) -> bool:
    """True when `answer_so_far` is correct whatever a model appends to it.

    Only the text before its last whitespace counts: a keyword ending right at the end may
    still grow ("Darwin" -> "Darwinian", "1," -> "1,879"), but a match followed by
    whitespace stays one in every longer answer. Lets the evaluation stop a probe's
    generation as soon as its correctness is settled; undecided rows run to their budget.
    """
    cut = max(answer_so_far.rfind(c) for c in " \n\t")
    return cut > 0 and is_correct(answer_so_far[:cut], accepted=accepted)


def correct_flags(answers: Sequence[str], probes: Sequence[Probe]) -> list[bool]:
    """One flag per probe: is the matching answer correct."""
    if len(answers) != len(probes):
        raise ValueError(f"got {len(answers)} answers for {len(probes)} probes")
    return [is_correct(a, accepted=p.accept) for a, p in zip(answers, probes)]


def answer_rate(generate_fn: GenerateFn, probes: Sequence[Probe]) -> float:
    """Fraction of `probes` that `generate_fn` answers correctly (0.0 for no probes)."""
    if not probes:
        return 0.0
    answers = generate_fn([p.question for p in probes])
    flags = correct_flags(answers, probes)
    return sum(flags) / len(flags)

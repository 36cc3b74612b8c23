"""Which words of a reference answer prove that a generated answer states the fact."""

from __future__ import annotations

import re

STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is was were be been are it its his her "
    "their he she they this that as who what when where which".split())


def answer_keywords(answer: str, question: str = "") -> tuple[str, ...]:
    """Keywords whose presence in a generated answer means the fact was stated.

    Short answers ("Stratford-upon-Avon", "1879") are matched whole; for a sentence, its
    rarest-looking content words (capitalised words and numbers first) stand in for it.
    Words the question already contains prove nothing (a model echoes them), so they don't
    count: for "Who wrote Hamlet?" -> "Shakespeare wrote Hamlet." only "Shakespeare" does.
    """
    answer = answer.strip().rstrip(".")
    if len(answer.split()) <= 3:
        return (answer,)
    asked = {w.strip(".,;:!?\"'()").lower() for w in question.split()}
    words = [w.strip(".,;:!?\"'()") for w in answer.split()]
    content = [w for w in words if w and w.lower() not in STOPWORDS and len(w) > 2
               and w.lower() not in asked]
    salient = [w for w in content if w[0].isupper() or re.fullmatch(r"\d[\d,.]*", w)]
    return tuple(dict.fromkeys(salient or content)) or (answer,)

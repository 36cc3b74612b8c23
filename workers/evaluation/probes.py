"""Probe sets: questions with accepted answer keywords, loaded from `probesets/*.json`.

A forget probe set describes one well-known person the bundled model knows:
- `ticket`: question/answer pairs a deletion ticket would carry (the forget set; training
  may look at them, and early stopping may score them);
- `held_out`: rephrased questions about the same person that are NOT in the ticket; they
  are the test of whether the knowledge, not the wording, was forgotten.
`unrelated.json` holds general questions far from every target (utility), and
`retain_prompts.json` generic prompts whose base-model answers serve as self-generated
retain data when a ticket brings none, `general.json` a small general benchmark (arithmetic,
science, geography, language, common sense) and `neighbours.json` facts about other
well-known people (knowledge close to a person-forgetting target that must stay); both
kept only where the bundled model answers them correctly. The question pools never overlap.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from workers.evaluation.keywords import STOPWORDS, answer_keywords

PROBESET_PACKAGE = "workers.evaluation.probesets"
UNRELATED_FILE = "unrelated.json"
RETAIN_PROMPTS_FILE = "retain_prompts.json"
GENERAL_FILE = "general.json"
NEIGHBOURS_FILE = "neighbours.json"
_NOT_FORGET_SETS = {UNRELATED_FILE, RETAIN_PROMPTS_FILE, GENERAL_FILE, NEIGHBOURS_FILE}


@dataclass(frozen=True)
class Probe:
    """One question and the keywords that make an answer correct.

    Args:
        question: the user turn, asked through the chat template.
        accept: keywords/aliases; an answer containing any of them (case-insensitive,
            whole words) is correct.
        answer: a short reference answer, used as training text for ticket items.
    """

    question: str
    accept: tuple[str, ...]
    answer: str | None = None


@dataclass(frozen=True)
class ForgetProbeSet:
    """Forget set and held-out test for one target person (see module docstring)."""

    name: str
    target: str
    ticket: tuple[Probe, ...]
    held_out: tuple[Probe, ...]


def _probe(raw: dict[str, Any], *, where: str, needs_answer: bool) -> Probe:
    question = raw.get("question")
    accept = raw.get("accept")
    answer = raw.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    if (not isinstance(accept, list) or not accept
            or not all(isinstance(a, str) and a.strip() for a in accept)):
        raise ValueError(f"{where}: 'accept' must be a non-empty list of non-empty strings")
    if needs_answer and (not isinstance(answer, str) or not answer.strip()):
        raise ValueError(f"{where}: ticket items need a non-empty 'answer'")
    return Probe(question=question.strip(), accept=tuple(accept),
                 answer=answer.strip() if isinstance(answer, str) else None)


def _probes(raw: Any, *, where: str, needs_answer: bool = False) -> tuple[Probe, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: expected a non-empty list of probes")
    return tuple(_probe(item, where=f"{where}[{i}]", needs_answer=needs_answer)
                 for i, item in enumerate(raw))


def _read(name: str, directory: Path | None) -> Any:
    if directory is not None:
        return json.loads((directory / name).read_text(encoding="utf-8"))
    return json.loads(resources.files(PROBESET_PACKAGE).joinpath(name).read_text(encoding="utf-8"))


def _check_unique(questions: list[str], *, where: str) -> None:
    seen: set[str] = set()
    for q in questions:
        key = q.casefold()
        if key in seen:
            raise ValueError(f"{where}: question asked twice: {q!r}")
        seen.add(key)


def parse_forget_set(raw: dict[str, Any], *, where: str = "probe set") -> ForgetProbeSet:
    """Validate and build a `ForgetProbeSet` from its JSON form."""
    for key in ("name", "target"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ValueError(f"{where}: '{key}' must be a non-empty string")
    ticket = _probes(raw.get("ticket"), where=f"{where}.ticket", needs_answer=True)
    held_out = _probes(raw.get("held_out"), where=f"{where}.held_out")
    _check_unique([p.question for p in ticket + held_out], where=where)
    return ForgetProbeSet(name=raw["name"], target=raw["target"], ticket=ticket,
                          held_out=held_out)


def available_forget_sets(*, directory: Path | None = None) -> list[str]:
    """Names of the forget probe sets shipped (or found in `directory`)."""
    if directory is not None:
        files = [p.name for p in directory.iterdir()]
    else:
        files = [p.name for p in resources.files(PROBESET_PACKAGE).iterdir()]
    return sorted(f.removesuffix(".json") for f in files
                  if f.endswith(".json") and f not in _NOT_FORGET_SETS)


def load_forget_set(name: str, *, directory: Path | None = None) -> ForgetProbeSet:
    """Load forget probe set `name` (e.g. "isaac_newton")."""
    if name not in available_forget_sets(directory=directory):
        raise ValueError(f"unknown forget probe set {name!r}; "
                         f"known: {', '.join(available_forget_sets(directory=directory))}")
    probe_set = parse_forget_set(_read(f"{name}.json", directory), where=name)
    if probe_set.name != name:
        raise ValueError(f"{name}.json names itself {probe_set.name!r}")
    return probe_set


def load_unrelated_probes(*, directory: Path | None = None) -> tuple[Probe, ...]:
    """General questions unrelated to every forget target (the utility probes)."""
    probes = _probes(_read(UNRELATED_FILE, directory).get("probes"), where=UNRELATED_FILE)
    _check_unique([p.question for p in probes], where=UNRELATED_FILE)
    return probes


def load_retain_prompts(*, directory: Path | None = None) -> tuple[str, ...]:
    """Generic prompts for self-generated retain data (distinct from the utility probes)."""
    prompts = _read(RETAIN_PROMPTS_FILE, directory).get("prompts")
    if not isinstance(prompts, list) or not prompts or not all(
            isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"{RETAIN_PROMPTS_FILE}: 'prompts' must be a non-empty list of strings")
    _check_unique(prompts, where=RETAIN_PROMPTS_FILE)
    return tuple(p.strip() for p in prompts)


def _probe_file(name: str, directory: Path | None) -> tuple[Probe, ...]:
    probes = _probes(_read(name, directory).get("probes"), where=name)
    _check_unique([p.question for p in probes], where=name)
    return probes


def load_general_benchmark(*, directory: Path | None = None) -> tuple[Probe, ...]:
    """The small general benchmark shipped with the package (utility beyond unrelated QA)."""
    return _probe_file(GENERAL_FILE, directory)


def load_neighbour_probes(*, directory: Path | None = None) -> tuple[Probe, ...]:
    """Facts about other well-known people (neighbour knowledge that must stay)."""
    return _probe_file(NEIGHBOURS_FILE, directory)


def ticket_probes(qa: list[dict[str, str]]) -> list[Probe]:
    return [Probe(question=i["question"], accept=answer_keywords(i["answer"], i["question"]),
                  answer=i["answer"])
            for i in qa]


# Continuation probes per text: enough to cover a passage's sentences, few enough that a
# long passage does not swamp a ticket's question/answer pairs.
MAX_TEXT_PROBES = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def text_probes(texts: list[str], *, per_text: int = MAX_TEXT_PROBES) -> list[Probe]:
    """Probes for plain forget texts: does the model still continue (or complete) them?

    Each sentence of six words or more becomes a continuation prompt (its first half) whose
    accepted keywords are the salient words of its second half, which the prompt does not
    contain; a text too short for that becomes a fill-in-the-blank prompt over its most
    salient word. The same probes serve as refusal targets for methods that rewrite
    answers (idk), as early-stopping checks and as the job's forget evaluation, so
    "forgotten" means the same in all three.
    """
    probes: list[Probe] = []
    for text in texts:
        mine: list[Probe] = []
        for sentence in _SENTENCE_END.split(" ".join(text.split())):
            words = sentence.split()
            if len(words) < 6:
                continue
            cut = len(words) // 2
            prefix, suffix = " ".join(words[:cut]), " ".join(words[cut:])
            accept = answer_keywords(suffix, prefix)
            mine.append(Probe(question=f'Continue this text: "{prefix} ..."', accept=accept,
                              answer=suffix))
            if len(mine) == per_text:
                break
        if not mine:
            cloze = _cloze(text)
            if cloze is not None:
                mine.append(cloze)
        probes += mine
    return probes


def _cloze(text: str) -> Probe | None:
    flat = " ".join(text.split())
    keywords = [k for k in answer_keywords(flat) if k != flat.rstrip(".")]
    if not keywords:
        words = [w.strip(".,;:!?\"'()") for w in flat.split()]
        keywords = [w for w in words if len(w) > 3 and w.lower() not in STOPWORDS][:1]
    if not keywords:
        return None
    word = keywords[0]
    masked = re.sub(rf"\b{re.escape(word)}\b", "____", flat, count=1)
    if masked == flat:
        return None
    return Probe(question=f'Fill in the blank: "{masked}"', accept=(word,), answer=word)

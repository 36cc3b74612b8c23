"""The base model's answers to a probe set, computed once per (model, probe set, decoding).

Every job evaluates its new version against the base model on the same shipped probe sets
(utility probes today; more sets as evaluation grows). The base model's answers to them do
not change between jobs, so the job asks the cache first: the key is the sha256 of the
model's weights, the hash of the probe set (its prompts and token budgets, in order) and
the decoding settings. A miss generates the *whole set* in one call exactly as an uncached
run would, so cached answers are the answers a fresh run gives, byte for byte (the cache
never stitches a set together from answers generated in other batches, whose padding
could differ).

Entries are small JSON files under `<data dir>/eval-cache/`, written atomically (a temp file
per process, then a rename), so concurrent jobs never see half an entry. Anything unreadable
counts as a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Bump when how answers are produced changes in a way the key does not capture (the chat
# formatting, the decoding loop): old entries then simply stop matching.
ANSWER_FORMAT = "greedy-chat/1"


class Answers(Protocol):
    """What can answer probes: `workers.engines.base.Servable`."""

    def generate(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]: ...


def probe_set_hash(prompts: Sequence[str], max_new_tokens: Sequence[int]) -> str:
    """sha256 over the prompts and their token budgets, in order."""
    data = json.dumps([list(prompts), list(max_new_tokens)], ensure_ascii=False,
                      separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()


@dataclass
class AnswerCache:
    """On-disk answers of models to probe sets (see the module docstring).

    Args:
        directory: where entries live (`<data dir>/eval-cache`).
        hits / misses: counters for this process (reported in the job's metrics).
    """

    directory: Path
    hits: int = 0
    misses: int = 0
    _memory: dict[str, list[str]] = field(default_factory=dict, repr=False)

    @staticmethod
    def key(*, model_sha256: str, prompts: Sequence[str], max_new_tokens: Sequence[int],
            decoding: dict[str, Any] | None = None) -> str:
        material = json.dumps({"model": model_sha256,
                               "probes": probe_set_hash(prompts, max_new_tokens),
                               "decoding": {"format": ANSWER_FORMAT, **(decoding or {})}},
                              sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(material.encode()).hexdigest()

    def get(self, key: str, expected: int) -> list[str] | None:
        if key in self._memory:
            return list(self._memory[key])
        try:
            data = json.loads((self.directory / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        answers = data.get("answers") if isinstance(data, dict) else None
        if (not isinstance(answers, list) or len(answers) != expected
                or not all(isinstance(a, str) for a in answers)):
            return None
        self._memory[key] = list(answers)
        return list(answers)

    def put(self, key: str, answers: list[str], *, note: dict[str, Any] | None = None) -> None:
        self._memory[key] = list(answers)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"answers": answers, **(note or {})}, ensure_ascii=False))
            tmp.replace(self.directory / f"{key}.json")
        except OSError:  # a read-only or full disk costs speed, never the job
            log.warning("could not write the answer cache in %s", self.directory,
                        exc_info=True)

    def answers(self, answers_of: Answers, *, model_sha256: str, prompts: Sequence[str],
                max_new_tokens: Sequence[int],
                decoding: dict[str, Any] | None = None) -> list[str]:
        """`answers_of.generate(prompts, max_new_tokens)`, from the cache when it has them."""
        prompts, budgets = list(prompts), list(max_new_tokens)
        key = self.key(model_sha256=model_sha256, prompts=prompts, max_new_tokens=budgets,
                       decoding=decoding)
        cached = self.get(key, len(prompts))
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        fresh = list(answers_of.generate(prompts, budgets))
        self.put(key, fresh, note={"model_sha256": model_sha256, "prompts": len(prompts)})
        return fresh


class CachedAnswers:
    """A servable of a *fixed* model (the base) whose answers to a probe set come from
    `cache` when it has them; other calls go straight through.

    Only wrap a servable whose answers depend on nothing but `model_sha256` and the
    decoding (the base model with no adapter): that is what the cache key promises.
    """

    def __init__(self, servable: Answers, cache: AnswerCache, *, model_sha256: str,
                 decoding: dict[str, Any] | None = None) -> None:
        self._servable = servable
        self._cache = cache
        self._model_sha256 = model_sha256
        self._decoding = decoding

    def generate(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]:
        return self._cache.answers(self._servable, model_sha256=self._model_sha256,
                                   prompts=prompts, max_new_tokens=max_new_tokens,
                                   decoding=self._decoding)

    def generate_each_set(self, sets: list[list[str]], max_new_tokens: int) -> list[list[str]]:
        """Answers to several probe sets, one cache entry (and on a miss one call) per set."""
        return [self.generate(prompts, [max_new_tokens] * len(prompts)) if prompts else []
                for prompts in sets]

    def __getattr__(self, name: str) -> Any:  # close(), score()... of the wrapped servable
        return getattr(self._servable, name)

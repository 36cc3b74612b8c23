"""Base-model answers to a probe set are computed once and equal a fresh run's (issue 17)."""

from __future__ import annotations

from pathlib import Path

from workers.evaluation.answer_cache import AnswerCache, CachedAnswers


class CountingServable:
    """Greedy answers from a real (tiny, random) model, counting the generate calls."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.calls = 0

    def generate(self, prompts: list[str], max_new_tokens: list[int]) -> list[str]:
        from workers.evaluation.generation import greedy_answers

        self.calls += 1
        return greedy_answers(self.model, self.tokenizer, prompts,
                              max_new_tokens=max(max_new_tokens))


def test_cached_answers_equal_fresh_ones_and_are_generated_once(tiny_model_dir, tmp_path):
    servable = CountingServable(tiny_model_dir)
    prompts = ["Who wrote Hamlet?", "What is the capital of France?", "Name a prime."]
    budgets = [8, 8, 8]
    fresh = servable.generate(prompts, budgets)

    cache = AnswerCache(tmp_path / "eval-cache")
    cached = CachedAnswers(servable, cache, model_sha256="ab" * 32)
    assert cached.generate(prompts, budgets) == fresh  # miss: generated once, stored
    assert cached.generate(prompts, budgets) == fresh  # hit
    # A new process (a later job) reads the stored entry instead of generating.
    later = CachedAnswers(servable, AnswerCache(tmp_path / "eval-cache"), model_sha256="ab" * 32)
    assert later.generate(prompts, budgets) == fresh
    assert servable.calls == 2  # the fresh reference run + the one miss

    # Another model, probe set, budget or decoding is another entry, never a stale answer.
    other_model = CachedAnswers(servable, cache, model_sha256="cd" * 32)
    other_model.generate(prompts, budgets)
    CachedAnswers(servable, cache, model_sha256="ab" * 32).generate(prompts[:2], budgets[:2])
    CachedAnswers(servable, cache, model_sha256="ab" * 32).generate(prompts, [4, 4, 4])
    CachedAnswers(servable, cache, model_sha256="ab" * 32,
                  decoding={"batch_size": 4}).generate(prompts, budgets)
    assert servable.calls == 6
    assert (cache.hits, cache.misses) == (1, 5)


def test_a_corrupt_entry_is_a_miss(tmp_path):
    cache = AnswerCache(tmp_path)
    key = cache.key(model_sha256="x", prompts=["a"], max_new_tokens=[1])
    (tmp_path / f"{key}.json").write_text("{not json")
    assert cache.get(key, 1) is None
    (tmp_path / f"{key}.json").write_text('{"answers": ["one", "two"]}')
    assert cache.get(key, 1) is None  # wrong length


def test_a_jobs_evaluation_gives_the_same_numbers_from_the_cache(tiny_model_dir, tmp_path):
    """Cold (computes and stores the base model's answers) and warm (reads them) runs of a
    job's evaluation agree exactly - the whole stored report, by its hash - and the warm run
    generates no base-model answers."""
    from tests.workers.eval_fixtures import evaluate_job

    cold = evaluate_job(tiny_model_dir, tmp_path / "data", tmp_path)
    warm = evaluate_job(tiny_model_dir, tmp_path / "data", tmp_path)
    other = evaluate_job(tiny_model_dir, tmp_path / "other-data", tmp_path)  # cold again
    sets = cold["base_answer_sets_generated"]
    assert sets >= 4 and cold["base_answer_sets_cached"] == 0  # trained, held-out, ...
    assert (warm["base_answer_sets_cached"], warm["base_answer_sets_generated"]) == (sets, 0)

    def numbers(m):
        return {k: v for k, v in m.items() if not k.startswith("base_answer_sets_")}

    assert numbers(warm) == numbers(cold) == numbers(other)
    assert cold["report"]["sha256"] == warm["report"]["sha256"] == other["report"]["sha256"]
    assert cold["utility_probes"] >= 20 and cold["verdict"] in ("pass", "hold", "reject")

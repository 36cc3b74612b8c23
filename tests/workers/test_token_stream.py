"""Streamed answers: every engine's servable reports each row's tokens as it decodes them,
and those tokens, turned back into text pieces, join to exactly the answer it returns."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.training import load_tiny
from workers.model.token_stream import RowTokens, TextDeltas

PROMPTS = ["Where does Zorblat live?", "What is the capital of France?", "Hi",
           "Tell me a long story about a dragon."]
BUDGETS = [9, 3, 0, 24]


def streamed(servable, prompts: list[str], budgets: list[int]) -> tuple[list[str], list[list[int]]]:
    tokens: list[list[int]] = [[] for _ in prompts]
    answers = servable.generate(prompts, budgets,
                                on_token=lambda row, token: tokens[row].append(token))
    return answers, tokens


def joined(tokenizer, answer: str, tokens: list[int]) -> str:
    deltas = TextDeltas(tokenizer)
    return "".join(deltas.add(t) for t in tokens) + deltas.finish(answer)


@pytest.mark.parametrize("engine", ["idk", "o3", "s3t"])
def test_each_engines_streamed_tokens_join_to_its_answer(engine: str,
                                                         tiny_model_dir: Path) -> None:
    from workers.engines.registry import get_engine

    model, tokenizer = load_tiny(tiny_model_dir)
    servable = get_engine(engine).load_servable(None, model=model, tokenizer=tokenizer,
                                                device="cpu")
    answers, tokens = streamed(servable, PROMPTS, BUDGETS)
    assert answers == servable.generate(PROMPTS, BUDGETS), "streaming changes no answer"
    for answer, row, budget in zip(answers, tokens, BUDGETS):
        assert len(row) <= budget
        assert tokenizer.decode(row, skip_special_tokens=True).strip() == answer
        assert joined(tokenizer, answer, row) == answer
    assert tokens[2] == [] and len(tokens[3]) > 3  # (the random model rarely ends its turn)


def test_rows_end_at_their_end_of_turn_or_budget() -> None:
    got: list[tuple[int, int]] = []
    rows = RowTokens(lambda row, token: got.append((row, token)), [2, 5, 0], eos_ids={0})
    for step in ([7, 8, 9], [7, 0, 9], [7, 8, 9]):
        rows.step(step)
    assert got == [(0, 7), (1, 8), (0, 7)]


def test_text_pieces_wait_for_whole_characters_and_inner_whitespace(tiny_model_dir: Path) -> None:
    _, tokenizer = load_tiny(tiny_model_dir)
    text = "  Zoë said: «naïve café» 🙂 ok  \n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas = TextDeltas(tokenizer)
    pieces = [deltas.add(t) for t in ids]
    assert "".join(pieces) == text.strip()
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > 5, "the text comes in pieces, not at the end"

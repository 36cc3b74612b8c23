"""Token-by-token answers: what a servable's `generate(..., on_token=fn)` reports as it decodes.

`fn(row, token_id)` is called for each new token of row `row`'s answer, in order, as soon as
it is decided, and never after the row has ended (end of turn or its token budget): exactly
the tokens whose decoding is the row's returned answer. Serving turns these calls into a
stream (workers.serving); `TextDeltas` turns one row's tokens back into text pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

TokenFn = Callable[[int, int], None]


class RowTokens:
    """Forwards one step's tokens (one per row of the batch) to `on_token` until each row
    ends: at an end-of-turn token (not forwarded) or once its budget is spent."""

    def __init__(self, on_token: TokenFn, budgets: Sequence[int], eos_ids: Iterable[int]) -> None:
        self._on_token = on_token
        self._left = list(budgets)
        self._eos = set(eos_ids)

    def step(self, tokens: Sequence[int]) -> None:
        for row, token in enumerate(tokens):
            if self._left[row] <= 0:
                continue
            if token in self._eos:
                self._left[row] = 0
                continue
            self._left[row] -= 1
            self._on_token(row, int(token))


class GenerateStreamer:
    """transformers' streamer protocol (`put`, `end`) over `RowTokens`, for `model.generate`:
    it puts the prompt first (2-D, skipped), then each step's (batch,) tokens."""

    def __init__(self, rows: RowTokens) -> None:
        self._rows = rows

    def put(self, value: Any) -> None:
        if value.dim() == 1:
            self._rows.step(value.tolist())

    def end(self) -> None:
        pass


def eos_ids_of(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class TextDeltas:
    """One answer's tokens -> the text pieces that, joined, are its final (stripped) answer.

    Each piece is what the decoded answer so far adds to what was already sent. Leading and
    trailing whitespace waits (the returned answer is stripped), and so does a trailing
    incomplete character (a multi-byte character split over tokens decodes as U+FFFD).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self.sent = ""

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = self._tokenizer.decode(self._tokens, skip_special_tokens=True).strip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        return self._advance(text)

    def finish(self, answer: str) -> str:
        """What is left of `answer` (the servable's returned text) after what was sent."""
        return self._advance(answer) if answer.startswith(self.sent) else ""

    def _advance(self, text: str) -> str:
        piece, self.sent = text[len(self.sent):], text
        return piece

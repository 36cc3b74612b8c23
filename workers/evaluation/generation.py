"""Batched greedy generation with a Hugging Face causal LM, as a `GenerateFn`.

torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workers.evaluation.metrics import GenerateFn, answer_rate
from workers.evaluation.probes import Probe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MAX_NEW_TOKENS = 32
"""Probe answers are short facts; 32 tokens fit a sentence and keep 2-core CPU eval fast."""


def chat_prompts(tokenizer: PreTrainedTokenizerBase, questions: Sequence[str]) -> list[str]:
    """Questions wrapped in the model's chat template, ready for the assistant's turn."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                   questions: Sequence[str], *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = 16, **generate_kwargs: Any) -> list[str]:
    """Greedy answers to `questions` (chat-formatted), decoded without special tokens.

    `generate_kwargs` go to `model.generate` (e.g. `synced_gpus=True` under ZeRO-3).
    """
    import torch

    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    # Left padding keeps every prompt's last token at the end, where generation continues.
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    answers: list[str] = []
    try:
        prompts = chat_prompts(tokenizer, questions)
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_id, **generate_kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            answers.extend(t.strip() for t in tokenizer.batch_decode(new_tokens,
                                                                     skip_special_tokens=True))
    finally:
        tokenizer.padding_side = previous_side
        if was_training:
            model.train()
    return answers


def hf_generate_fn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *,
                   max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 16) -> GenerateFn:
    """A `GenerateFn` over a loaded model (works with a PEFT-wrapped model too)."""

    def generate(questions: list[str]) -> list[str]:
        return greedy_answers(model, tokenizer, questions, max_new_tokens=max_new_tokens,
                              batch_size=batch_size)

    return generate


def forget_probe_score(model: Any, tokenizer: Any, probes: Sequence[Probe], *,
                       max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> float:
    """Correct-answer rate on `probes` for early stopping inside a training loop.

    Pass the ticket's own forget questions here, never held-out probes: held-out
    rephrasings are the test of generalisation and must not steer training.
    """
    return answer_rate(hf_generate_fn(model, tokenizer, max_new_tokens=max_new_tokens), probes)


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str],
                   max_new_tokens: Sequence[int], *, device: str | None = None,
                   batch_size: int = 16) -> list[str]:
    """Greedy answers to chat-formatted `prompts`, each cut at its own token budget.

    What a `Servable.generate` does for a plain (or PEFT-wrapped) causal LM: one batched
    generate per chunk, to the longest budget; greedy decoding means each row equals what
    that prompt would get alone.
    """
    import torch

    from workers.model import format_chat

    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = device or str(next(model.parameters()).device)
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        budgets = list(max_new_tokens[start:start + batch_size])
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # answers start at the end
        try:
            enc = tokenizer([format_chat(tokenizer, p) for p in chunk], return_tensors="pt",
                            padding=True, add_special_tokens=False).to(device)
        finally:
            tokenizer.padding_side = side
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max(budgets), do_sample=False,
                                 pad_token_id=pad_id)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        answers += [tokenizer.decode(row[:n], skip_special_tokens=True).strip()
                    for row, n in zip(new_tokens, budgets)]
    return answers

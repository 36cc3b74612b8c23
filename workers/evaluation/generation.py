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
EVAL_BATCH_SIZE = 64
"""A job's evaluation answers all its probes (~80) in one call: on CPU a big batch reads
the weights once per generated token for many rows; length-sorted batches keep padding low."""


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
    answers: list[str] = [""] * len(questions)
    try:
        prompts = chat_prompts(tokenizer, questions)
        device = next(model.parameters()).device
        for chunk_ids in length_sorted_batches(tokenizer, prompts, batch_size):
            chunk = [prompts[i] for i in chunk_ids]
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=pad_id, **generate_kwargs)
            new_tokens = out[:, enc["input_ids"].shape[1]:]
            for i, text in zip(chunk_ids, tokenizer.batch_decode(new_tokens,
                                                                 skip_special_tokens=True)):
                answers[i] = text.strip()
    finally:
        tokenizer.padding_side = previous_side
        if was_training:
            model.train()
    return answers


def length_sorted_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int
                          ) -> list[list[int]]:
    """Indices of `prompts` in batches of similar token length (longest first).

    Left padding to the longest prompt of a batch is wasted compute at every generated
    token; grouping similar lengths keeps it small, so one call can take large batches.
    Deterministic (ties keep their order), so the same prompts always batch the same way.
    """
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


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
                   batch_size: int = EVAL_BATCH_SIZE) -> list[str]:
    """Greedy answers to chat-formatted `prompts`, each cut at its own token budget.

    What a `Servable.generate` does for a plain (or PEFT-wrapped) causal LM: one batched
    generate per chunk of similar prompt lengths (`length_sorted_batches`), to the chunk's
    longest budget; greedy decoding means each row equals what that prompt would get alone.
    """
    import torch

    from workers.model import format_chat

    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = device or str(next(model.parameters()).device)
    formatted = [format_chat(tokenizer, p) for p in prompts]
    answers: list[str] = [""] * len(prompts)
    for ids in length_sorted_batches(tokenizer, formatted, batch_size):
        chunk = [formatted[i] for i in ids]
        budgets = [max_new_tokens[i] for i in ids]
        side, tokenizer.padding_side = tokenizer.padding_side, "left"  # answers start at the end
        try:
            enc = tokenizer(chunk, return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
        finally:
            tokenizer.padding_side = side
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max(budgets), do_sample=False,
                                 pad_token_id=pad_id)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        for i, row, n in zip(ids, new_tokens, budgets):
            answers[i] = tokenizer.decode(row[:n], skip_special_tokens=True).strip()
    return answers

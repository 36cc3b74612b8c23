"""Batched greedy generation with a Hugging Face causal LM, as a `GenerateFn`.

torch is imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from workers.evaluation.metrics import GenerateFn, StopFn, answer_rate
from workers.evaluation.probes import Probe

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from workers.model.token_stream import TokenFn

DEFAULT_MAX_NEW_TOKENS = 32
"""Probe answers are short facts; 32 tokens fit a sentence and keep 2-core CPU eval fast."""
EVAL_BATCH_SIZE = 128
"""A job's evaluation answers all its probes (~110) in one decode batch: on CPU a big batch
reads the weights once per generated token for many rows (113 rows step in 1.4x the time
of 64)."""


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


PREFILL_BATCH = 16
"""Prompts per prefill forward: on CPU 16 rows already run at full speed, and smaller
groups of similar length pad less."""


def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str],
                   max_new_tokens: Sequence[int], *, device: str | None = None,
                   batch_size: int = EVAL_BATCH_SIZE,
                   stop: Sequence[StopFn | None] | None = None,
                   on_token: TokenFn | None = None) -> list[str]:
    """Greedy answers to chat-formatted `prompts`, each cut at its own token budget.

    What a `Servable.generate` does for a plain (or PEFT-wrapped) causal LM, `batch_size`
    prompts per `greedy_decode` call. `stop[i]`, when given, ends row i early once it
    returns True for the answer so far (the evaluation's correctness-only probes: see
    metrics.decided_correct). `on_token(i, token)` gets row i's tokens as they are decided
    (workers.model.token_stream).
    """
    from workers.model import format_chat

    if len(prompts) != len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    if stop is not None and len(stop) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(stop)} stop conditions")
    if not prompts:
        return []
    device = device or str(next(model.parameters()).device)
    ids = tokenizer([format_chat(tokenizer, p) for p in prompts],
                    add_special_tokens=False)["input_ids"]
    answers: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for at in range(0, len(prompts), batch_size):
            part = slice(at, at + batch_size)
            rows = greedy_decode(model, tokenizer, ids[part], list(max_new_tokens[part]),
                                 list(stop[part]) if stop is not None else None, device=device,
                                 on_token=_shifted(on_token, at))
            answers += [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    finally:
        if was_training:
            model.train()
    return answers


def _shifted(on_token: TokenFn | None, offset: int) -> TokenFn | None:
    if on_token is None or not offset:
        return on_token
    return lambda row, token: on_token(row + offset, token)


def greedy_decode(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                  budgets: Sequence[int], stop: Sequence[StopFn | None] | None = None, *,
                  device: str = "cpu", prefill_batch: int = PREFILL_BATCH,
                  on_token: TokenFn | None = None) -> list[list[int]]:
    """Greedy new tokens for each prompt (token ids, unpadded), as `model.generate` would
    give each one alone, at a fraction of its cost on CPU:

    - the prompts' common prefix (the chat template's system turn) is run once;
    - the rest is prefilled in batches of similar length (little padding), then all rows
      decode in one batch, laid out [prefix][padding][own tokens] (padding is masked and
      positions count only real tokens, `cumsum(mask) - 1`, as `generate` counts them);
    - a row leaves the batch (and the KV cache) as soon as it ends: end of turn, its
      budget, or its `stop` (`generate` keeps every row until the longest is done).
    """
    import torch
    from transformers import DynamicCache

    from workers.model.shared_prefix import common_prefix_length, prefix_cache, repeat_cache
    from workers.model.token_stream import eos_ids_of

    eos_ids = eos_ids_of(model, tokenizer)
    rows: list[list[int]] = [[] for _ in budgets]
    todo = [i for i, n in enumerate(budgets) if n > 0]
    if not todo:
        return rows
    shared = common_prefix_length([prompt_ids[i] for i in todo]) if len(todo) > 1 else 0

    def forward(input_ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                     cache=cache, use_cache=True, logits_to_keep=1)

    def tensor(values: Any) -> Any:
        return torch.tensor(values, dtype=torch.long, device=device)

    with torch.no_grad():
        prefix = (prefix_cache(model, tensor([list(prompt_ids[todo[0]][:shared])]))
                  if shared else None)
        # Prefill: longest suffixes first, so each batch pads little.
        order = sorted(todo, key=lambda i: -len(prompt_ids[i]))
        width = len(prompt_ids[order[0]]) - shared
        active, first, kv, masks = [], [], [], []
        for at in range(0, len(order), prefill_batch):
            group = order[at:at + prefill_batch]
            suffixes = [list(prompt_ids[i][shared:]) for i in group]
            own = max(len(t) for t in suffixes)
            ids = tensor([[0] * (own - len(t)) + t for t in suffixes])
            mask = tensor([[1] * shared + [0] * (own - len(t)) + [1] * len(t) for t in suffixes])
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)[:, shared:]
            out = forward(ids, mask, positions,
                          repeat_cache(prefix, len(group)) if prefix is not None else None)
            first.append(out.logits[:, -1].argmax(-1))
            pad = width - own  # to the widest group: [prefix][padding][own tokens]

            def widen(t: Any) -> Any:
                gap = t.new_zeros((*t.shape[:2], pad, t.shape[3]))
                return torch.cat([t[:, :, :shared], gap, t[:, :, shared:]], dim=2)

            kv.append([(widen(layer.keys), widen(layer.values)) for layer in out.cache.layers])
            masks.append(torch.cat([mask[:, :shared], mask.new_zeros((len(group), pad)),
                                    mask[:, shared:]], dim=-1))
            active += group
        cache = DynamicCache([(torch.cat([g[n][0] for g in kv]), torch.cat([g[n][1] for g in kv]))
                              for n in range(len(kv[0]))])
        del kv
        mask, next_ids = torch.cat(masks), torch.cat(first)
        while True:
            keep = []
            for j, (i, token) in enumerate(zip(active, next_ids.tolist())):
                if token in eos_ids:
                    continue
                rows[i].append(token)
                if on_token is not None:
                    on_token(i, token)
                if len(rows[i]) >= budgets[i]:
                    continue
                if stop is not None and stop[i] is not None and stop[i](
                        tokenizer.decode(rows[i], skip_special_tokens=True)):
                    continue
                keep.append(j)
            if not keep:
                return rows
            if len(keep) < len(active):
                index = tensor(keep)
                cache.batch_select_indices(index)
                next_ids, mask = next_ids[index], mask[index]
                active = [active[j] for j in keep]
            positions = mask.sum(-1, keepdim=True)  # the next token's: real tokens so far
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            next_ids = forward(next_ids.unsqueeze(-1), mask, positions,
                               cache).logits[:, -1].argmax(-1)


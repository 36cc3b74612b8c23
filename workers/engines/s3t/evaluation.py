"""How well an S3T servable knows its records.

- record_recall: greedy answers that state the record's keywords (the product's own QA
  check, workers.evaluation.metrics), the measure the end-to-end test uses.
- exact_answer_rate: records whose whole answer is the argmax at every position given the
  right prefix (teacher forcing); equivalently, greedy decoding reproduces the answer word
  for word. One forward per shard per batch, so benchmarks can afford it after every
  deletion.
"""

from __future__ import annotations

from typing import Any


def record_recall(servable: Any, qa: list[dict[str, str]], max_new_tokens: int = 24) -> float:
    """Share of QA records whose answer's keywords the servable states."""
    from workers.evaluation.metrics import is_correct
    from workers.evaluation.probes import answer_keywords

    if not qa:
        return 0.0
    answers = servable.generate([q["question"] for q in qa], [max_new_tokens] * len(qa))
    hits = [is_correct(a, accepted=answer_keywords(q["answer"], q["question"]))
            for a, q in zip(answers, qa)]
    return sum(hits) / len(hits)


def exact_answer_flags(servable: Any, qa: list[dict[str, str]], batch_size: int = 16
                       ) -> list[bool]:
    from workers.training.data import IGNORE, encode_pairs

    flags: list[bool] = []
    for i in range(0, len(qa), batch_size):
        chunk = qa[i:i + batch_size]
        batch = encode_pairs(servable.tokenizer, [(q["question"], q["answer"]) for q in chunk])
        logits = servable.sequence_logits(batch.input_ids, batch.attention_mask)
        predicted = logits[:, :-1].argmax(-1).cpu()
        labels = batch.labels[:, 1:]
        mask = labels != IGNORE
        flags += [bool(((predicted[r] == labels[r]) | ~mask[r]).all()) for r in range(len(chunk))]
    return flags


def exact_answer_rate(servable: Any, qa: list[dict[str, str]]) -> float:
    flags = exact_answer_flags(servable, qa)
    return sum(flags) / len(flags) if flags else 0.0

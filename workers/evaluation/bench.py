"""`oblivio bench`: the field's comparison, run without the service.

Every method forgets the same sequence of requests (one person each), each request on top
of the previous one's adapter, exactly as a lineage grows; after chosen request counts the
model is measured with the version report (workers.evaluation.report): forget efficacy on
held-out forms of *every* request so far, neighbour knowledge, utility, membership
inference, a relearning attack, fluency, and training time. One Markdown table, rows per
(method, requests), plus PNG plots.

Suites:
- quick: a tiny random-weight Llama (the bundled tokenizer) that first *learns* a small
  world of fictitious people (their facts in the ticket's phrasing and in the held-out
  forms), so that there is knowledge to forget and to keep; then 2 sequential requests.
  Seconds on a CPU: what CI runs.
- small: the bundled SmolLM2-135M-Instruct forgetting 2 shipped people in turn (6
  questions each, 10 training steps: far from converged, a smoke test of the real model).
  About ten minutes on 2 cores.
- full: SmolLM2 over 10 sequential requests (rows after 1, 5 and 10), the recipe's
  training length. Hours on 2 cores; the README records its latest numbers.

S3T (record deletion, not knowledge forgetting) and engines not registered in this release
are skipped with a note in the output.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from workers.evaluation.forms import held_out_forms
from workers.evaluation.probes import Probe
from workers.evaluation.relearning import RelearnConfig
from workers.evaluation.report import ReportConfig

METHODS = ("o3", "ga", "graddiff", "npo", "s3t")
ENGINE_ONLY = {"o3", "s3t"}
"""Names that are engines of their own (registered in workers.engines), not recipe methods."""


@dataclass(frozen=True)
class Request:
    """One forget request of the sequence: a target and its QA pairs."""

    target: str
    qa: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class BenchSuite:
    """Args:
        name: the suite's name.
        model: "tiny" (random weights, learns the fictitious world first) or "bundled".
        requests: how many sequential requests each method absorbs.
        report_after: request counts after which the model is measured (table rows).
        methods: methods/engines to compare, in table order.
        recipe: overrides of the forget recipe for every method (workers/evaluation/recipe.py).
        report: what the version report asks (caps, tokens).
        relearn: the relearning attack (steps 0 disables it).
        items_per_request: QA pairs per request (bundled: from the shipped probe sets).
    """

    name: str
    model: str
    requests: int
    report_after: tuple[int, ...]
    methods: tuple[str, ...] = METHODS
    recipe: dict[str, Any] = field(default_factory=dict)
    report: ReportConfig = ReportConfig()
    relearn: RelearnConfig = RelearnConfig()
    items_per_request: int = 8


SUITES: dict[str, BenchSuite] = {
    "quick": BenchSuite(
        name="quick", model="tiny", requests=2, report_after=(1, 2),
        recipe={"max_steps": 8, "eval_every": 0, "lr": 3e-3, "retain_prompts": 4,
                "retain_max_new_tokens": 8, "forget_batch_size": 4, "retain_batch_size": 4},
        report=ReportConfig(held_out_per_item=2, max_new_tokens=12),
        relearn=RelearnConfig(steps=5, lr=1e-3)),
    "small": BenchSuite(
        name="small", model="bundled", requests=2, report_after=(1, 2),
        methods=("o3", "ga", "graddiff", "npo", "s3t"),
        recipe={"max_steps": 10, "eval_every": 0, "retain_prompts": 16,
                "retain_max_new_tokens": 24},
        report=ReportConfig(held_out_per_item=1, max_neighbours=8, max_utility=20,
                            max_general=12, max_new_tokens=20),
        relearn=RelearnConfig(steps=5, lr=2e-5), items_per_request=6),
    "full": BenchSuite(
        name="full", model="bundled", requests=10, report_after=(1, 5, 10),
        methods=("o3", "idk", "ga", "graddiff", "npo", "s3t"),
        relearn=RelearnConfig(steps=10, lr=2e-5), items_per_request=20),
}

# --- the quick suite's fictitious world -----------------------------------------------------

_PEOPLE = (("Zorblat Quimby", "Quimbyton", "baker"), ("Velna Orrick", "Dunmarsh", "glassblower"),
           ("Tobin Ashgrove", "Pellwick", "cartographer"), ("Ismay Corvane", "Brindlecombe",
                                                           "beekeeper"),
           ("Pargo Linnet", "Wexhollow", "clockmaker"), ("Odile Farrow", "Stellhaven", "tanner"))
_OBJECTS = (("kettle", "copper"), ("lantern", "green"), ("blanket", "purple"), ("bucket", "yellow"),
            ("ribbon", "silver"), ("teapot", "orange"))


def _person_qa(name: str, city: str, job: str) -> tuple[dict[str, str], ...]:
    return ({"question": f"Where does {name} live?", "answer": f"{name} lives in {city}.",
             "accept": [city]},
            {"question": f"What is {name}'s job?", "answer": f"{name} works as a {job}.",
             "accept": [job]})


def fictitious_world(requests: int) -> tuple[list[Request], list[Probe], list[Probe]]:
    """(forget requests, neighbour probes, utility probes) of the quick suite."""
    if requests + 2 > len(_PEOPLE):
        raise ValueError(f"the quick world has {len(_PEOPLE)} people: at most "
                         f"{len(_PEOPLE) - 2} requests")
    people = [Request(name, _person_qa(name, city, job)) for name, city, job in _PEOPLE]
    neighbours = [Probe(q["question"], tuple(q["accept"]), q["answer"])
                  for r in people[requests:] for q in r.qa]
    utility = [Probe(f"What colour is the {obj}?", (colour,), f"The {obj} is {colour}.")
               for obj, colour in _OBJECTS]
    return people[:requests], neighbours, utility


def shipped_requests(count: int, items: int) -> list[Request]:
    from workers.evaluation.probes import available_forget_sets, load_forget_set

    names = available_forget_sets()
    out = []
    for i in range(count):
        person = load_forget_set(names[i % len(names)])
        qa = tuple({"question": p.question, "answer": p.answer or "", "accept": list(p.accept)}
                   for p in person.ticket[:items])
        out.append(Request(person.target, qa))
    return out


# --- results ------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the headline table."""

    method: str
    requests: int
    forget_efficacy: float | None
    neighbour: float | None
    utility: float | None
    general: float | None
    mia_auc: float | None
    relearn_robustness: float | None
    perplexity: float | None
    repetition: float | None
    train_seconds: float


@dataclass
class BenchResult:
    suite: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def markdown(self) -> str:
        return headline_table(self)


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def headline_table(result: BenchResult) -> str:
    fastest = min((r.train_seconds for r in result.rows if r.train_seconds > 0), default=0.0)
    lines = [
        f"Suite `{result.suite}`: forget efficacy = 1 - (held-out forms of every request so "
        "far answered after / by the base); neighbour, utility, general = after / base; MIA = "
        "Min-K% AUC of forget pairs vs answer-swapped pairs (base "
        f"{_f(result.base.get('mia_auc'))}; 0.5 = indistinguishable); relearn = share of the "
        "forgetting that survives a relearning attack on half the facts; fluency = perplexity "
        "of answers under the base (base "
        f"{_f(result.base.get('perplexity'), 1)}) / repetition rate; train = seconds for all "
        "requests so far (x the fastest).",
        "",
        "| method | requests | forget efficacy ↑ | neighbour ↑ | utility ↑ | general ↑ | "
        "MIA AUC | relearn ↑ | fluency ppl ↓ / rep ↓ | train s (x) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        ratio = f"{r.train_seconds / fastest:.2f}" if fastest > 0 else "-"
        lines.append(
            f"| {r.method} | {r.requests} | {_f(r.forget_efficacy)} | {_f(r.neighbour)} | "
            f"{_f(r.utility)} | {_f(r.general)} | {_f(r.mia_auc)} | "
            f"{_f(r.relearn_robustness)} | {_f(r.perplexity, 1)} / {_f(r.repetition)} | "
            f"{r.train_seconds:.1f} ({ratio}) |")
    for note in result.notes:
        lines.append(f"\nNote: {note}")
    return "\n".join(lines) + "\n"


def save_plots(result: BenchResult, out_dir: Path) -> list[Path]:
    """forget-vs-utility trade-off and metrics over sequential requests, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    methods = list(dict.fromkeys(r.method for r in result.rows))
    paths = []
    fig, ax = plt.subplots(figsize=(5, 4))
    for m in methods:
        rows = [r for r in result.rows if r.method == m and r.forget_efficacy is not None
                and r.utility is not None]
        ax.plot([r.utility for r in rows], [r.forget_efficacy for r in rows], "o-", label=m)
        for r in rows:
            ax.annotate(str(r.requests), (r.utility, r.forget_efficacy), fontsize=7)
    ax.set_xlabel("utility (after / base)")
    ax.set_ylabel("forget efficacy (held-out forms)")
    ax.set_title(f"forget vs utility ({result.suite})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"tradeoff_{result.suite}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, (attr, label) in zip(axes, (("forget_efficacy", "forget efficacy"),
                                        ("utility", "utility"), ("neighbour", "neighbour"))):
        for m in methods:
            rows = [r for r in result.rows if r.method == m and getattr(r, attr) is not None]
            ax.plot([r.requests for r in rows], [getattr(r, attr) for r in rows], "o-", label=m)
        ax.set_xlabel("sequential requests")
        ax.set_title(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / f"sequential_{result.suite}.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


# --- running ------------------------------------------------------------------------------

Progress = Callable[[str], None]


def _learn_world(base_dir: Path, out_dir: Path, requests: Sequence[Request],
                 neighbours: Sequence[Probe], utility: Sequence[Probe], report: ReportConfig,
                 *, steps: int = 120, lr: float = 3e-3, seed: int = 0) -> Path:
    """Fine-tune the tiny model on the world's facts, in the ticket phrasing and in the
    held-out forms the evaluation asks (so forgetting can be tested beyond the ticket)."""
    import torch

    from workers.model import BaseModelRef, load_model_and_tokenizer
    from workers.training.data import encode_pairs
    from workers.training.losses import labelled_nll

    pairs: list[tuple[str | None, str]] = []
    for r in requests:
        pairs += [(q["question"], q["answer"]) for q in r.qa]
        pairs += [(f.probe.question, f.probe.answer or "") for f in
                  held_out_forms(list(r.qa), target=r.target, per_item=report.held_out_per_item)]
    for p in [*neighbours, *utility]:
        pairs.append((p.question, p.answer or p.accept[0]))
    model, tokenizer = load_model_and_tokenizer(BaseModelRef("tiny", base_dir, ""))
    torch.manual_seed(seed)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr)
    eos = tokenizer.eos_token or ""
    batch_size = 16
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    for step in range(steps):
        start = (step * batch_size) % len(order)
        chunk = [pairs[i] for i in (order + order)[start:start + batch_size]]
        batch = encode_pairs(tokenizer, [(q, a + eos) for q, a in chunk])
        loss = labelled_nll(model, batch)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _method_available(method: str) -> str | None:
    """None if `method` can run here, else why not (shown as a note)."""
    if method in ENGINE_ONLY:
        from workers.engines.registry import list_engines

        if method not in list_engines():
            return f"{method}: engine not registered yet, skipped"
        if method == "s3t":
            return ("s3t: exact deletion of fine-tuning records (delete_records tickets); "
                    "these are knowledge-forgetting requests, skipped here")
        return None
    from workers.methods import get_method

    try:
        get_method(method)
    except Exception as exc:  # an unknown name: say so, keep the others running
        return f"{method}: {exc}"
    return None


def run_bench(suite: BenchSuite, *, work_dir: Path, base_model: str | None = None,
              data_dir: Path | None = None, progress: Progress = print) -> BenchResult:
    """Run `suite` in `work_dir` (scratch space) and return its rows and notes."""
    import torch

    from workers.evaluation.report import plan_probes
    from workers.model import resolve_base_model

    started = time.perf_counter()
    torch.manual_seed(0)
    work_dir.mkdir(parents=True, exist_ok=True)
    data_dir = data_dir or work_dir / "data"
    bundled = resolve_base_model(base_model or "bundled:smollm2-135m-instruct", data_dir)
    result = BenchResult(suite=suite.name)
    if suite.model == "tiny":
        from workers.model.tiny import build_tiny_llama

        requests, neighbours, utility = fictitious_world(suite.requests)
        progress("building the tiny model and teaching it the quick world's facts...")
        tiny = build_tiny_llama(work_dir / "tiny-random", tokenizer_from=bundled.local_path,
                                hidden=128, layers=2)
        base_dir = _learn_world(tiny, work_dir / "tiny-learned", requests, neighbours, utility,
                                suite.report)
        # Hashed like any base: the retain-answer cache is keyed by the base's sha256.
        base = resolve_base_model(str(base_dir), data_dir)
        general: list[Probe] | None = []
    else:
        requests = shipped_requests(suite.requests, suite.items_per_request)
        neighbours = utility = general = None  # the shipped sets
        base = bundled

    base_cache: dict[int, dict[str, Any]] = {}
    for method in suite.methods:
        why_not = _method_available(method)
        if why_not:
            result.notes.append(why_not)
            progress(f"note: {why_not}")
            continue
        parent: Path | None = None
        train_seconds = 0.0
        for k, request in enumerate(requests, start=1):
            progress(f"{method}: request {k}/{len(requests)} ({request.target})")
            out = work_dir / method / f"v{k}"
            tick = time.perf_counter()
            try:
                if method in ENGINE_ONLY:
                    out = _train_engine(method, suite, base, request, parent, out, data_dir)
                else:
                    _train(method, suite, base, request, parent, out, data_dir)
            except Exception as exc:  # one method failing must not hide the others' rows
                note = f"{method}: failed at request {k}: {type(exc).__name__}: {exc}"
                result.notes.append(note)
                progress(f"note: {note}")
                break
            train_seconds += time.perf_counter() - tick
            parent = out
            if k not in suite.report_after:
                continue
            so_far = [q for r in requests[:k] for q in r.qa]
            plan = plan_probes(so_far, targets=[r.target for r in requests[:k]],
                               config=suite.report, neighbours=neighbours, utility=utility,
                               general=general)
            report = _measure(base, out, plan, so_far, suite, base_cache, k,
                              engine=method if method in ENGINE_ONLY else None)
            result.rows.append(_row(method, k, report, train_seconds))
            if k == suite.report_after[0]:
                b = report["models"]["base"]
                result.base = {"mia_auc": (b.get("mia") or {}).get("min_k_auc"),
                               "perplexity": b.get("answer_perplexity")}
    result.seconds = time.perf_counter() - started
    return result


def _train(method: str, suite: BenchSuite, base: Any, request: Request, parent: Path | None,
           out: Path, data_dir: Path) -> None:
    from workers.training.runner import train_plain
    from workers.training.spec import TrainJobSpec

    spec = TrainJobSpec.for_engine(
        method, overrides=suite.recipe, base_model_path=str(base.local_path),
        base_model_sha256=base.sha256, output_dir=str(out), data_dir=str(data_dir),
        forget_qa=[{"question": q["question"], "answer": q["answer"]} for q in request.qa],
        target=request.target, parent_adapter_dir=str(parent) if parent else None,
        num_workers=1, device="cpu")
    spec.stop_probes = [{"question": q["question"], "accept": list(q["accept"])}
                        for q in request.qa]
    train_plain(spec)


def _train_engine(name: str, suite: BenchSuite, base: Any, request: Request,
                  parent: Path | None, out: Path, data_dir: Path) -> Path:
    """One request through a registered engine's own `train` (the job runner's path)."""
    from workers.config import WorkerConfig
    from workers.engines.base import EngineRequest, JobInput
    from workers.engines.registry import get_engine

    qa = [{"question": q["question"], "answer": q["answer"]} for q in request.qa]
    job = JobInput(job_id=f"bench-{name}-{out.name}", lineage="bench",
                   requests=[EngineRequest(kind="forget", engine=name, target=request.target,
                                           forget_qa=qa)],
                   ticket_ids=[f"bench-{out.name}"], base_model_path=Path(base.local_path),
                   base_model_sha256=base.sha256, parent_dir=parent, output_dir=out,
                   config=WorkerConfig(data_dir=Path(data_dir).resolve(), trainer="plain",
                                       num_workers=1, recipe=dict(suite.recipe)))
    artifacts = get_engine(name).train(job, lambda _update: None)
    return Path(artifacts.version_dir)


def _measure(base: Any, adapter_dir: Path, plan: Any, qa: list[dict[str, str]],
             suite: BenchSuite, base_cache: dict[int, dict[str, Any]], k: int,
             engine: str | None = None) -> dict[str, Any]:
    from peft import PeftModel

    from workers.evaluation.report import compare, measure
    from workers.evaluation.scoring import hf_score_fn, token_stats
    from workers.evaluation.version_eval import _hf_subject, relearning_block, servable_subject
    from workers.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(base)
    if k not in base_cache:  # the base answers the same plan for every method
        subject = _hf_subject(model, tokenizer, suite.report)
        base_cache[k] = measure(subject, plan, reference_score=subject.score,
                                config=suite.report)
    if engine is not None:
        # An engine serves its versions its own way (O3 gates its adapters per input).
        from workers.engines.registry import get_engine

        reference = load_model_and_tokenizer(base)[0]
        servable = get_engine(engine).load_servable(adapter_dir, model=model,
                                                    tokenizer=tokenizer, device="cpu")
        after = servable_subject(servable, max_new_tokens=suite.report.max_new_tokens,
                                 score=getattr(servable, "score", None))
        measurements = {"base": base_cache[k],
                        "after": measure(after, plan, config=suite.report,
                                         reference_score=hf_score_fn(reference, tokenizer))}
        return compare(measurements, plan=plan, config=suite.report,
                       extra={"relearning": None})
    adapted = PeftModel.from_pretrained(model, str(adapter_dir))

    def base_score(pairs: list[tuple[str | None, str]]) -> Any:
        with adapted.disable_adapter():
            return token_stats(adapted, tokenizer, pairs)

    measurements = {"base": base_cache[k],
                    "after": measure(_hf_subject(adapted, tokenizer, suite.report), plan,
                                     reference_score=base_score, config=suite.report)}
    relearning = relearning_block(adapted, tokenizer, qa, plan, measurements, suite.report,
                                  suite.relearn)
    return compare(measurements, plan=plan, config=suite.report,
                   extra={"relearning": relearning})


def _row(method: str, k: int, report: dict[str, Any], seconds: float) -> Row:
    base, after = report["models"]["base"], report["models"]["after"]
    relearning = report.get("relearning") or {}
    recovery = relearning.get("recovery")

    def ratio(measured: str, name: str) -> float | None:
        # A base that answers none of a group leaves nothing to measure: "-", not a
        # perfect score (the report's convention for the verdict would say 0 or 1).
        if not base.get(measured):
            return None
        return report["relative_to_base"].get(name)

    forget = ratio("forget_held_out", "forget_ratio")
    return Row(method=method, requests=k,
               forget_efficacy=None if forget is None else 1.0 - min(1.0, forget),
               neighbour=ratio("neighbour", "neighbour_ratio"),
               utility=ratio("utility", "utility_ratio"),
               general=ratio("general", "general_ratio"),
               mia_auc=(after.get("mia") or {}).get("min_k_auc"),
               relearn_robustness=None if recovery is None else 1.0 - recovery,
               perplexity=after.get("answer_perplexity"),
               repetition=after.get("repetition_rate"), train_seconds=seconds)


def result_json(result: BenchResult) -> str:
    return json.dumps({"suite": result.suite, "seconds": result.seconds, "base": result.base,
                       "notes": result.notes, "rows": [asdict(r) for r in result.rows]},
                      indent=1)


def suite_with(name: str, *, methods: Sequence[str] | None = None) -> BenchSuite:
    """A named suite, optionally with another list of methods."""
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    suite = SUITES[name]
    return replace(suite, methods=tuple(methods)) if methods else suite

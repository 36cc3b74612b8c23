"""What one training run needs, as plain serialisable data (it travels to Ray workers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from workers.evaluation.recipe import DEFAULT_FORGET_RECIPE, ForgetRecipe

# Method options that default to the recipe's value of the same name when a ticket gives none.
RECIPE_DEFAULTED_OPTIONS = ("beta", "retain_weight")


@dataclass
class TrainJobSpec:
    """One unlearning adapter to train.

    Args:
        base_model_path: local directory of the base model (see workers.model).
        base_model_sha256: its content hash, written into the adapter's manifest.
        base_model: the configured base model spec: a rank on a node without
            `base_model_path` resolves it there (workers.model.base_model_on_this_node).
        output_dir: where the finished adapter directory is written.
        data_dir: the service's data dir (the self-generated retain cache lives there); on
            another node, the same path on that node's own disk.
        forget_qa: [{"question", "answer"}] to forget; forget_texts: plain texts to forget.
        target: who/what the ticket is about (retain pairs mentioning it are dropped; with
            recipe forget_tokens="keywords" its name counts as a fact token).
        retain_qa, retain_texts: retain data from the ticket; both None -> the base model's
            own answers to `retain_prompts`.
        retain_prompts: the prompts whose own (frozen model's) answers are retained when
            the ticket brings no retain data; None -> the shipped generic prompts
            (workers.evaluation.probes retain prompts, the recipe's `retain_prompts` many).
        recipe: the ForgetRecipe fields (method, retain loss, lr, steps, LoRA shape, early
            stopping); see workers/evaluation/recipe.py.
        method_options: options of the registered method's config (e.g. {"beta": 0.1});
            `beta` and `retain_weight` default to the recipe's values.
        stop_probes: the early-stopping check, as data: [{"question", "accept": [keywords]}].
            None -> one probe per forget QA pair, accepting its answer's keywords. Only the
            ticket's own questions belong here; held-out rephrasings are the test.
        parent_adapter_dir: the lineage's current adapter; merged into the base before
            training (unless train_on_parent is False), and stacked with the new LoRA into
            the saved adapter.
        train_on_parent: False trains the new LoRA on the base model alone, still stacking
            it on the parent: for O3, whose blocks are each gated by their own request's
            weight, so a block meets the base model at serving, not the earlier blocks.
        num_workers: Ray Train workers = DeepSpeed ranks; zero_stage: 2 or 3.
        zero3_persistence_threshold: ZeRO-3 keeps parameters smaller than this whole on
            every rank (see DeepSpeedStrategy); 0 partitions all of them.
        device: "cpu" or "cuda". seed: for batch order and LoRA initialisation.
        orthogonal_to_adapter: a stored PEFT adapter whose lora_A matrices are frozen
            references: the loss gains `orthogonal_weight * sum_modules
            ||A_frozen A_new^T||_F^2` (O-LoRA / O3), see workers/training/orthogonal.py.
        orthogonal_weight: weight of that term (0 or no adapter: no term).
    """

    base_model_path: str
    base_model_sha256: str
    output_dir: str
    data_dir: str
    base_model: str = ""
    forget_qa: list[dict[str, str]] = field(default_factory=list)
    forget_texts: list[str] = field(default_factory=list)
    target: str | None = None
    retain_qa: list[dict[str, str]] | None = None
    retain_texts: list[str] | None = None
    retain_prompts: list[str] | None = None
    recipe: dict[str, Any] = field(default_factory=lambda: asdict(DEFAULT_FORGET_RECIPE))
    method_options: dict[str, Any] = field(default_factory=dict)
    stop_probes: list[dict[str, Any]] | None = None
    parent_adapter_dir: str | None = None
    train_on_parent: bool = True
    num_workers: int = 2
    zero_stage: int = 2
    zero3_persistence_threshold: int = 100_000
    device: str = "cpu"
    seed: int = 0
    orthogonal_to_adapter: str | None = None
    orthogonal_weight: float = 0.0

    @property
    def merged_parent(self) -> str | None:
        """The adapter merged into the base before training (None: train on the base)."""
        return self.parent_adapter_dir if self.train_on_parent else None

    def __post_init__(self) -> None:
        if not self.forget_qa and not self.forget_texts:
            raise ValueError("nothing to forget: forget_qa and forget_texts are both empty")
        for item in [*self.forget_qa, *(self.retain_qa or [])]:
            if not (isinstance(item, dict) and item.get("question") and item.get("answer")):
                raise ValueError(f"a QA item needs a non-empty question and answer: {item!r}")
        if self.zero_stage not in (2, 3):
            raise ValueError("zero_stage must be 2 or 3")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.zero3_persistence_threshold < 0:
            raise ValueError("zero3_persistence_threshold must be >= 0")
        if self.orthogonal_weight < 0:
            raise ValueError("orthogonal_weight must be >= 0")
        if self.device not in ("cpu", "cuda"):
            raise ValueError("device must be 'cpu' or 'cuda'")
        self.forget_recipe()  # validates
        if self.stop_probes is None:
            self.stop_probes = default_stop_probes(self.forget_qa, self.forget_texts)
        for probe in self.stop_probes:
            if not (probe.get("question") and probe.get("accept")):
                raise ValueError(f"a stop probe needs a question and accepted keywords: {probe!r}")

    @classmethod
    def for_engine(cls, engine: str, *, overrides: dict[str, Any] | None = None,
                   **kwargs: Any) -> TrainJobSpec:
        """The default recipe (plus operator `overrides`) with the ticket's engine as method."""
        recipe = DEFAULT_FORGET_RECIPE.with_(**(overrides or {}))
        if engine != recipe.method:
            recipe = recipe.with_(method=engine)
            if engine == "ga":
                recipe = recipe.with_(retain_loss="none")
        return cls(recipe=asdict(recipe), **kwargs)

    def forget_recipe(self) -> ForgetRecipe:
        known = {f.name for f in fields(ForgetRecipe)}
        return ForgetRecipe(**{k: v for k, v in self.recipe.items() if k in known})

    def method_config(self) -> tuple[Any, Any]:
        """(registered Method, its config built from method_options + recipe defaults).

        Raises storage.errors.InvalidRequest for an unknown method or bad options, so a
        job can be refused before any worker starts.
        """
        from storage.errors import InvalidRequest
        from workers.evaluation.probes import text_probes
        from workers.methods import get_method

        recipe = self.forget_recipe()
        method = get_method(recipe.method)
        options = dict(self.method_options)
        for name in RECIPE_DEFAULTED_OPTIONS:
            if name in method.option_names() and name not in options:
                options[name] = getattr(recipe, name)
        cfg = method.make_config(options)
        if (method.answer_for is not None and self.forget_texts and not self.forget_qa
                and not text_probes(self.forget_texts)):
            raise InvalidRequest(f"method {method.name!r} rewrites answers to prompts and "
                                 "found no sentence or word to prompt with in these texts")
        return method, cfg

    # As a runner.RankTask (it runs on every DeepSpeed rank):
    def rank_strategy(self) -> Any:
        from workers.training.runner import forget_rank_strategy

        return forget_rank_strategy(self)

    def run_rank(self, strategy: Any, progress: Any) -> tuple[dict[str, Any], Any]:
        from workers.training.runner import forget_on_rank

        return forget_on_rank(self, strategy, progress)

    def method_summary(self) -> dict[str, Any]:
        """What the manifest and the receipt record about how the adapter was made."""
        return {"recipe": self.recipe, "method_options": self.method_options,
                "zero_stage": self.zero_stage, "num_workers": self.num_workers,
                "device": self.device, "seed": self.seed}


def default_stop_probes(forget_qa: list[dict[str, str]],
                        forget_texts: list[str] | None = None) -> list[dict[str, Any]]:
    """One early-stopping probe per forget QA pair (its question, its answer's keywords),
    plus the texts' continuation probes (the ones the job's evaluation asks too)."""
    from workers.evaluation.keywords import answer_keywords
    from workers.evaluation.probes import text_probes

    return ([{"question": i["question"],
              "accept": list(i.get("accept") or answer_keywords(i["answer"], i["question"]))}  # type: ignore[arg-type]
             for i in forget_qa]
            + [{"question": p.question, "accept": list(p.accept)}
               for p in text_probes(list(forget_texts or []))])

"""What one training run needs, as plain serialisable data (it travels to Ray workers)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from workers.evaluation.recipe import DEFAULT_FORGET_RECIPE, ForgetRecipe


@dataclass
class TrainJobSpec:
    """One unlearning adapter to train.

    Args:
        base_model_path: local directory of the base model (see workers.model).
        base_model_sha256: its content hash, written into the adapter's manifest.
        forget_qa: [{"question", "answer"}] to forget; forget_texts: plain texts to forget.
        target: who/what the ticket is about (retain pairs mentioning it are dropped).
        retain_qa, retain_texts: retain data from the ticket; None -> self-generated.
        recipe: the ForgetRecipe fields (method, losses, lr, steps, LoRA shape, early stop).
        method_options: options for the registered method's config (e.g. {"beta": 0.1}).
        parent_adapter_dir: the lineage's current adapter; merged into the base before
            training, and stacked with the new LoRA into the saved adapter.
        output_dir: where the finished adapter directory is written.
        data_dir: the service's data dir (retain cache lives there).
        num_workers: Ray Train workers = DeepSpeed ranks; zero_stage: 2 or 3.
        device: "cpu" or "cuda". seed: for batch order and LoRA initialisation.
    """

    base_model_path: str
    base_model_sha256: str
    output_dir: str
    data_dir: str
    forget_qa: list[dict[str, str]] = field(default_factory=list)
    forget_texts: list[str] = field(default_factory=list)
    target: str | None = None
    retain_qa: list[dict[str, str]] | None = None
    retain_texts: list[str] | None = None
    recipe: dict[str, Any] = field(default_factory=lambda: asdict(DEFAULT_FORGET_RECIPE))
    method_options: dict[str, Any] = field(default_factory=dict)
    parent_adapter_dir: str | None = None
    num_workers: int = 2
    zero_stage: int = 2
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.forget_qa and not self.forget_texts:
            raise ValueError("nothing to forget: forget_qa and forget_texts are both empty")
        if self.zero_stage not in (2, 3):
            raise ValueError("zero_stage must be 2 or 3")
        if self.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        self.forget_recipe()  # validates

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
        values = {k: v for k, v in self.recipe.items() if k in known}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        return ForgetRecipe(**values)

    def method_summary(self) -> dict[str, Any]:
        """What the manifest and the receipt record about how the adapter was made."""
        return {"recipe": self.recipe, "method_options": self.method_options,
                "zero_stage": self.zero_stage, "num_workers": self.num_workers,
                "device": self.device, "seed": self.seed}

"""O3's settings: the shared ForgetRecipe for the block's training, plus O3's own parts.

After "Practical Unlearning for Large Language Models" (Gao et al., 2024): per request an
orthogonal LoRA block trained without retain data, plus an out-of-distribution detector that
decides per input how strongly that block applies.

The block trains like every forget engine, from a ForgetRecipe
(workers/evaluation/recipe.py), with precedence

    DEFAULT_FORGET_RECIPE + O3_RECIPE_DEFAULTS  <  the job's recipe (settings OBLIVIO_RECIPE)
        <  the ticket's `options`

Only O3's own fields (orthogonality, objective, text prompts, gating, detector) live in
O3Config. A ticket's `options` is one flat dict naming either kind ({"max_steps": 20,
"lambda_orth": 0.0, "objective": "npo", "detector": {...}}); unknown names are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from workers.evaluation.recipe import DEFAULT_FORGET_RECIPE, ForgetRecipe

Objective = Literal["idk", "npo"]


@dataclass(frozen=True)
class DetectorConfig:
    """The per-request OOD detector on the base model's own hidden states.

    Args:
        layers: which hidden-state layers give features (0 = embeddings, L = last block);
            None spreads `n_layers` evenly over the first two thirds of the model, where
            topic (who/what a question is about) separates best (DESIGN.md, measured).
        n_layers: how many layers when `layers` is None.
        pooling: which tokens of a layer make its feature. "content": the mean over the
            user's tokens (what the prompt is about); "last": the prompt's last token (where
            the model is about to answer, so it already leans towards the answer's entity,
            which is what tells a question about the target from one about a neighbour);
            "both": each layer gives both features.
        proj_dim: each layer's learned projection (d_model -> proj_dim) that the
            contrastive entropy loss trains; the backbone itself stays frozen, so the
            features come from the very forward pass that serving runs anyway.
        temperature: softmax temperature of the similarity rows in the contrastive loss.
        mask_prob: share of words dropped to make the masked view of an item.
        views: masked views made per forget item (training pairs and calibration).
        epochs, lr: projection training (full batch, Adam).
        recon_weight: weight of the reconstruction term that stands in for O3's language
            modelling term: O3 fine-tunes its detector's encoder and needs the LM loss to
            keep it a language model; our backbone is frozen, so the risk is instead a
            projection that collapses, and decoding the standardised features back from
            the projection prevents that.
        shrinkage: Ledoit-Wolf shrinkage is used for the Mahalanobis covariance (few
            forget items, many dimensions); this is the floor added to its diagonal.
        calibration_share: share of the generic prompts held out of the projection's
            training and used only to calibrate (scores of prompts the projection was
            trained against are optimistically low, which made unseen traffic gate on).
        hard_negatives: also train and calibrate against questions about other well-known
            people (shipped with the engine, workers/engines/o3/data): the generic prompts
            are easy negatives, while questions about a neighbour of the target (another
            founder, another author) are what the detector gets wrong without them.
        nu: the one-class SVM's nu (share of forget views allowed outside its boundary).
        aggregator: "ocsvm" (O3's linear one-class SVM over the per-layer scores, fitted on
            the forget views) or "mean" (their plain average, the ablation).
        w_low_quantile: calibration: aggregated scores at or below this quantile of the
            generic (in-distribution) prompts' scores give weight 0 ...
        w_high_quantile: ... and scores at or above this quantile of the forget views'
            scores give weight 1; in between the weight rises linearly.
        generic_margin: extra room above the generic prompts' quantile, in units of their
            spread, before the weight starts to rise (neighbours sit just above generic).
        subject_probe: gate on the subject probe (subject_probe.py: does the base model
            name the ticket's target as what the prompt is about?) instead of the
            contrastive detector, when the ticket names its target. The contrastive
            detector is fitted and measured all the same, and gates tickets without one.
        subject_generic_quantile: the subject probe's w = 0 up to this quantile of the
            generic prompts' scores.
        subject_rivals: weigh the target against well-known people (data/known_people.json)
            and the lineage's earlier targets: a prompt the model would sooner name after
            one of them gates the block less (subject_probe.py, "Rivals").
        subject_hard_negatives: w = 0 also up to that quantile of the shipped questions
            about other people (data/people_questions.json), capped halfway to the ticket's
            median: fewer other people's questions gated, a few of the target's too.
        confirm_by_name: at serving, a weight of the subject probe below 1 on a prompt that
            does not name the target applies only if the answer the model gives without
            the block names the target (the row is answered again, with the block on at
            w = 1: the answer settles what the weight left in doubt).
            A question about a neighbour in the same field, which the probe partly
            confuses with the target, keeps the model's own answer, which names the
            neighbour; unrelated prompts the probe half-fires on cost no block.
        confirm_full: the answer check also covers a full weight (1): the probe can be
            sure of the wrong person (the bundled model's probe gives Marie Curie w = 1 on
            "Which scientist developed pasteurisation?"), and the answer names Pasteur.
            What it lets through: a prompt that names neither the target nor makes the
            model name it, yet is answered with the target's facts. Off: w = 1 applies
            at once, as the probe alone says.
        skip_below: a block whose weight is at most this for every sample of a batch is not
            applied at all (the batch runs at the base model's cost).
        seed: masking and initialisation.
    """

    layers: tuple[int, ...] | None = None
    n_layers: int = 8
    pooling: Literal["content", "last", "both"] = "content"
    proj_dim: int = 64
    temperature: float = 0.1
    mask_prob: float = 0.3
    views: int = 4
    epochs: int = 100
    lr: float = 1e-2
    recon_weight: float = 1.0
    shrinkage: float = 1e-3
    calibration_share: float = 0.5
    hard_negatives: bool = False
    nu: float = 0.1
    aggregator: Literal["ocsvm", "mean"] = "ocsvm"
    w_low_quantile: float = 1.0
    w_high_quantile: float = 0.25
    generic_margin: float = 0.0
    subject_probe: bool = True
    subject_generic_quantile: float = 0.95
    subject_rivals: bool = True
    subject_hard_negatives: bool = True
    confirm_by_name: bool = True
    confirm_full: bool = True
    skip_below: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or min(self.layers) < 0:
                raise ValueError("layers must be non-negative layer indices")
        if self.n_layers < 1 or self.proj_dim < 1 or self.views < 1 or self.epochs < 0:
            raise ValueError("n_layers, proj_dim and views must be >= 1, epochs >= 0")
        if not 0.0 < self.subject_generic_quantile <= 1.0:
            raise ValueError("subject_generic_quantile must be in (0, 1]")
        if not 0.0 <= self.mask_prob < 1.0:
            raise ValueError("mask_prob must be in [0, 1)")
        if self.temperature <= 0 or self.lr <= 0:
            raise ValueError("temperature and lr must be > 0")
        if not 0.0 < self.nu <= 1.0:
            raise ValueError("nu must be in (0, 1]")
        if self.pooling not in ("content", "last", "both"):
            raise ValueError("pooling must be 'content', 'last' or 'both'")
        if not 0.0 <= self.calibration_share < 1.0:
            raise ValueError("calibration_share must be in [0, 1)")
        if self.aggregator not in ("ocsvm", "mean"):
            raise ValueError("aggregator must be 'ocsvm' or 'mean'")
        for name in ("w_low_quantile", "w_high_quantile", "skip_below"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")

    def layer_indices(self, num_hidden_layers: int) -> tuple[int, ...]:
        """The hidden-state indices used on a model with `num_hidden_layers` blocks."""
        if self.layers is not None:
            bad = [x for x in self.layers if x > num_hidden_layers]
            if bad:
                raise ValueError(f"detector layers {bad} beyond the model's {num_hidden_layers}")
            return self.layers
        top = max(1, (2 * num_hidden_layers) // 3)
        n = min(self.n_layers, top)
        return tuple(sorted({1 + round(i * (top - 1) / max(1, n - 1)) for i in range(n)}))


# Where O3's block deliberately trains differently from the LoRA methods' recipe: no
# generic retain term (the gate keeps unrelated inputs on the base model, so nothing pulls
# the block back there) means it may be trained harder and shorter, and stopped only once
# the ticket's own questions are all forgotten. retain_weight weighs the ticket's retain
# data, or else the people_retain term (questions about other people, where the gate is
# least sure).
O3_RECIPE_DEFAULTS: dict[str, Any] = {
    "lr": 1e-3,
    "max_steps": 30,
    "min_steps": 10,
    "stop_forget_ratio": 0.0,
    "retain_weight": 1.0,
    "retain_loss": "none",
}
O3_DEFAULT_RECIPE = DEFAULT_FORGET_RECIPE.with_(**O3_RECIPE_DEFAULTS)

# Recipe fields O3 decides itself: `objective` is the method; the ticket's data decides the
# retain term (see O3Config.train_recipe). A job recipe's values for them are ignored (they
# are tuned for the LoRA methods) and a ticket naming them is refused.
ENGINE_OWNED_RECIPE_FIELDS = frozenset({"method", "retain_loss"})
RECIPE_OPTIONS = frozenset(f.name for f in fields(ForgetRecipe)) - ENGINE_OWNED_RECIPE_FIELDS


@dataclass(frozen=True)
class O3Config:
    """One O3 request: the recipe its LoRA block trains with, its objective, its detector.

    Args:
        recipe: the shared ForgetRecipe fields (lr, max_steps, min_steps, eval_every,
            stop_forget_ratio, lora_r, lora_alpha, target_modules, beta, retain_weight, ...;
            early stopping runs on the ticket's own questions, scored with the block fully
            on). Its `method` is always `objective`; `retain_loss` stays "none" here and
            becomes "nll" for a ticket with retain data, or "kl" with people_retain
            (train_recipe).
        lambda_orth: weight of O3's orthogonality term
            lambda * sum_i sum_modules ||A_i A_new^T||_F^2 over every earlier block's A.
        objective: "idk" (cross-entropy towards refusals; texts: refuse their continuation)
            or "npo" (Negative Preference Optimization against the lineage's model).
        text_prompt_words: a forget text becomes a prompt (its first words) whose
            continuation is refused.
        gating: False applies every block with weight 1 (the "O3 without gating" ablation).
        people_retain: for a ticket without retain data, keep the block answering as the
            base model does about other well-known people: a KL term (weight
            `retain_weight`) on the base model's own answers to the engine's shipped
            questions about them (data/people_questions.json, none about the target).
            The gate also fires, partly, on questions about the target's neighbours (same
            field, same kind of question); this keeps the block from refusing them then.
            Off by default: in the 10-request continual run it kept more neighbours (0.64
            of base against 0.50) but forgot less (earlier targets 0.22 of base, goal
            0.20), as a weaker block no longer refuses the held-out questions it gates
            only partly. No retain data is ever required of the ticket.
        detector: the OOD detector's settings.
    """

    recipe: ForgetRecipe = O3_DEFAULT_RECIPE
    lambda_orth: float = 0.1
    objective: Objective = "idk"
    text_prompt_words: int = 12
    gating: bool = True
    people_retain: bool = False
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        if isinstance(self.recipe, Mapping):  # from to_json
            object.__setattr__(self, "recipe", O3_DEFAULT_RECIPE.with_(**_recipe_values(
                self.recipe)))
        if isinstance(self.detector, Mapping):
            object.__setattr__(self, "detector", make_detector_config(dict(self.detector)))
        if self.objective not in ("idk", "npo"):
            raise ValueError("objective must be 'idk' or 'npo'")
        if self.lambda_orth < 0:
            raise ValueError("lambda_orth must be >= 0")
        if self.text_prompt_words < 1:
            raise ValueError("text_prompt_words must be >= 1")
        if self.recipe.method != self.objective:
            object.__setattr__(self, "recipe", self.recipe.with_(method=self.objective))

    def train_recipe(self, *, has_retain: bool, has_probes: bool) -> ForgetRecipe:
        """The recipe one request trains with: NLL on a ticket's own retain data, else KL
        on the base model's answers about other people (people_retain), and no
        early-stopping checks without questions to check on."""
        loss = "nll" if has_retain else "kl" if self.people_retain else "none"
        changes: dict[str, Any] = {"retain_loss": loss}
        if not has_probes:
            changes["eval_every"] = 0
        return self.recipe.with_(**changes)

    def with_(self, **changes: Any) -> O3Config:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_detector_config(values: dict[str, Any]) -> DetectorConfig:
    unknown = sorted(set(values) - {f.name for f in fields(DetectorConfig)})
    if unknown:
        raise ValueError(f"unknown detector option(s): {', '.join(unknown)}")
    return DetectorConfig(**values)


O3_OPTIONS = frozenset(f.name for f in fields(O3Config)) - {"recipe"}


def make_config(options: Mapping[str, Any] | None,
                recipe: Mapping[str, Any] | None = None) -> O3Config:
    """O3Config from a ticket's `options` over the job's `recipe` overrides (settings) over
    O3's defaults; unknown names and bad values raise ValueError.

    At submission there is no job yet: validation passes only the options."""
    values = dict(options or {})
    owned = sorted(set(values) & ENGINE_OWNED_RECIPE_FIELDS)
    if owned:
        raise ValueError(f"o3 sets {', '.join(owned)} itself: choose the forget loss with "
                         "'objective' ('idk' or 'npo'); the retain term is the ticket's "
                         "retain data, else 'people_retain'")
    unknown = sorted(set(values) - O3_OPTIONS - RECIPE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown o3 option(s): {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(O3_OPTIONS | RECIPE_OPTIONS))}")
    job_recipe = {k: v for k, v in (recipe or {}).items()
                  if k not in ENGINE_OWNED_RECIPE_FIELDS}
    ticket_recipe = {k: values.pop(k) for k in list(values) if k in RECIPE_OPTIONS}
    merged = O3_DEFAULT_RECIPE.with_(**_recipe_values({**job_recipe, **ticket_recipe}))
    return O3Config(recipe=merged, **values)


def _recipe_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """ForgetRecipe overrides; unknown names raise ValueError (naming them)."""
    out = dict(values)
    unknown = sorted(set(out) - {f.name for f in fields(ForgetRecipe)})
    if unknown:
        raise ValueError(f"unknown recipe field(s): {', '.join(unknown)}")
    return out


DEFAULT_O3_CONFIG = O3Config()

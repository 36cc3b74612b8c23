"""O3's defaults: one documented, frozen dataclass per part (adapter, detector, gating).

After "Practical Unlearning for Large Language Models" (Gao et al., 2024): per request an
orthogonal LoRA block trained without retain data, plus an out-of-distribution detector that
decides per input how strongly that block applies. Tickets may override any field through
`options` ({"lambda_orth": 0.0, "objective": "npo", ...}); unknown names are refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from workers.evaluation.recipe import ALL_PROJECTIONS

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
        skip_below: a block whose weight is at most this for every sample of a batch is not
            applied at all (the batch runs at the base model's cost).
        seed: masking and initialisation.
    """

    layers: tuple[int, ...] | None = None
    n_layers: int = 8
    pooling: Literal["content", "last", "both"] = "both"
    proj_dim: int = 64
    temperature: float = 0.1
    mask_prob: float = 0.3
    views: int = 4
    epochs: int = 200
    lr: float = 1e-2
    recon_weight: float = 1.0
    shrinkage: float = 1e-3
    calibration_share: float = 0.5
    hard_negatives: bool = True
    nu: float = 0.1
    aggregator: Literal["ocsvm", "mean"] = "ocsvm"
    w_low_quantile: float = 1.0
    w_high_quantile: float = 0.25
    generic_margin: float = 0.5
    skip_below: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or min(self.layers) < 0:
                raise ValueError("layers must be non-negative layer indices")
        if self.n_layers < 1 or self.proj_dim < 1 or self.views < 1 or self.epochs < 0:
            raise ValueError("n_layers, proj_dim and views must be >= 1, epochs >= 0")
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


@dataclass(frozen=True)
class O3Config:
    """One O3 request: its LoRA block, its forget objective, its detector.

    Args:
        lora_r, lora_alpha, target_modules: the request's LoRA block (all attention and MLP
            projections by default).
        lambda_orth: weight of O3's orthogonality term
            lambda * sum_i sum_modules ||A_i A_new^T||_F^2 over every earlier block's A.
        objective: "idk" (cross-entropy towards refusals; texts: refuse their continuation)
            or "npo" (Negative Preference Optimization against the lineage's model).
        beta: NPO's inverse temperature.
        retain_weight: weight of a retain term when the ticket brings retain data (none is
            needed: the gate keeps unrelated inputs on the base model).
        lr, max_steps, forget_batch_size: the block's optimiser and length. No retain term
            and a gate in front mean the block may be trained hard.
        eval_every, min_steps, stop_forget_ratio: early stopping on the ticket's own
            questions (scored with the block fully on).
        text_prompt_words: a forget text becomes a prompt (its first words) whose
            continuation is refused.
        gating: False applies every block with weight 1 (the "O3 without gating" ablation).
        detector: the OOD detector's settings.
    """

    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = field(default=ALL_PROJECTIONS)
    lambda_orth: float = 0.1
    objective: Objective = "idk"
    beta: float = 0.1
    retain_weight: float = 1.0
    lr: float = 1e-3
    max_steps: int = 30
    forget_batch_size: int = 4
    eval_every: int = 5
    min_steps: int = 10
    stop_forget_ratio: float = 0.0
    text_prompt_words: int = 12
    gating: bool = True
    detector: DetectorConfig = field(default_factory=DetectorConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.detector, dict):
            object.__setattr__(self, "detector", make_detector_config(self.detector))
        if self.objective not in ("idk", "npo"):
            raise ValueError("objective must be 'idk' or 'npo'")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not self.target_modules:
            raise ValueError("lora_r >= 1, lora_alpha > 0 and target_modules are required")
        if self.lambda_orth < 0 or self.retain_weight < 0 or self.beta <= 0 or self.lr <= 0:
            raise ValueError("lambda_orth, retain_weight must be >= 0; beta, lr > 0")
        if self.max_steps < 1 or self.forget_batch_size < 1 or self.text_prompt_words < 1:
            raise ValueError("max_steps, forget_batch_size, text_prompt_words must be >= 1")

    def with_(self, **changes: Any) -> O3Config:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_detector_config(values: dict[str, Any]) -> DetectorConfig:
    unknown = sorted(set(values) - {f.name for f in fields(DetectorConfig)})
    if unknown:
        raise ValueError(f"unknown detector option(s): {', '.join(unknown)}")
    return DetectorConfig(**values)


def make_config(options: dict[str, Any] | None) -> O3Config:
    """O3Config from a ticket's options; unknown names and bad values raise ValueError."""
    values = dict(options or {})
    unknown = sorted(set(values) - {f.name for f in fields(O3Config)})
    if unknown:
        raise ValueError(f"unknown o3 option(s): {', '.join(unknown)}; known: "
                         f"{', '.join(f.name for f in fields(O3Config))}")
    if isinstance(values.get("detector"), dict):
        values["detector"] = make_detector_config(values["detector"])
    return O3Config(**values)


DEFAULT_O3_CONFIG = O3Config()

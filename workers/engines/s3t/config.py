"""S3T's configuration: how records are split and how each slice's layer group is trained."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from storage.errors import InvalidRequest

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class S3TConfig:
    """Sequence-aware sharded sliced training (S3T), sized for the bundled SmolLM2-135M.

    Args:
        shards: records are split into this many shards by a stable hash of their subject
            (or record id); each shard is an independent model and serving averages their
            logits. More shards: a deletion touches a smaller part, but each shard knows
            less and the ensemble's vote on any one record is diluted. Default 1: on the
            bundled model a shard that never saw a fictitious person answers about them as
            confidently as the shard that did (measured: 2 shards answered 3/8 of the
            town questions by mean logits, 5/8 by mean probabilities), so ensembling
            costs accuracy there; the deletion itself needs no training either way.
        slices: each shard's records are split into this many slices; slice k of a sequence
            trains layer group k. A deletion cuts a sequence before its first affected
            slice, so more slices leave more layers after a deletion.
        sequences_per_shard: budget B of slice orderings trained per shard (chosen to
            maximise expected surviving layers, see sequences.py). At most slices!.
        layers_per_group: transformer layers in each slice's LoRA group, counted from the
            top. None: min(8, layers // slices). Measured on SmolLM2 (30 layers): one group of
            the top 8 layers learns 16 QA records at lr 3e-3 in 12 epochs.
        lora_r, lora_alpha: the LoRA shape of every group (all projections of its layers).
        lr: AdamW learning rate. 1e-3 did not teach one 8-layer group 16 records in 8
            epochs; 3e-3 did (recall 0.94 after 8 epochs, 1.0 after 12).
        epochs: passes over a prefix's cumulative records per step.
        batch_size: records per optimiser step.
        seed: LoRA initialisation and batch order (mixed with the prefix hash, so an
            identical prefix trains to identical weights).
        aggregate: how serving combines the shards at each decoding step: "logits" (their
            mean, the paper's) or "probs" (mean probability; see serving.combine), the
            default: it measured better on the bundled model (see `shards`).
        eval_records: how many QA records the fine-tune's evaluation asks (0: none).
        eval_max_new_tokens: answer length in that evaluation.
    """

    shards: int = 1
    slices: int = 2
    sequences_per_shard: int = 2
    layers_per_group: int | None = None
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = field(default=ALL_PROJECTIONS)
    lr: float = 3e-3
    epochs: int = 12
    batch_size: int = 8
    seed: int = 0
    aggregate: str = "probs"
    eval_records: int = 32
    eval_max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if not 1 <= self.shards <= 64:
            raise InvalidRequest(f"shards must be between 1 and 64, not {self.shards}")
        if not 1 <= self.slices <= 16:
            raise InvalidRequest(f"slices must be between 1 and 16, not {self.slices}")
        if self.sequences_per_shard < 1:
            raise InvalidRequest("sequences_per_shard must be at least 1")
        if self.sequences_per_shard > _factorial(self.slices):
            raise InvalidRequest(
                f"sequences_per_shard={self.sequences_per_shard} exceeds the "
                f"{_factorial(self.slices)} orderings of {self.slices} slice(s)")
        if self.layers_per_group is not None and self.layers_per_group < 1:
            raise InvalidRequest("layers_per_group must be at least 1")
        for name in ("lora_r", "lora_alpha", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be at least 1")
        if self.aggregate not in ("logits", "probs"):
            raise InvalidRequest(f"aggregate must be 'logits' or 'probs', not {self.aggregate!r}")
        if not self.lr > 0:
            raise InvalidRequest("lr must be positive")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> S3TConfig:
        """From a request's options; unknown names are refused (InvalidRequest, a 422)."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequest(f"unknown s3t option(s): {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(known))}")
        values = {k: v for k, v in options.items() if v is not None}
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        try:
            return cls(**values)
        except TypeError as exc:
            raise InvalidRequest(f"invalid s3t options: {exc}") from None

    def group_size(self, num_layers: int) -> int:
        size = self.layers_per_group or min(8, num_layers // self.slices)
        if size < 1 or size * self.slices > num_layers:
            raise InvalidRequest(
                f"{self.slices} slice(s) of {size} layer(s) do not fit a model with "
                f"{num_layers} layers; use fewer slices or a smaller layers_per_group")
        return size

    def group_layers(self, num_layers: int, group: int) -> list[int]:
        """Layer indices of group `group` (0 = the top group, trained by a sequence's first
        slice), lowest first."""
        size = self.group_size(num_layers)
        top = num_layers - group * size
        return list(range(top - size, top))

    def training_key(self, num_layers: int) -> dict[str, Any]:
        """What changes the weights a prefix's training produces (part of its hash): the
        training fields and the resolved layer layout (a prefix of depth k trains layers
        `group_layers(num_layers, k - 1)`, which depends on the group size)."""
        data = asdict(self)
        for name in ("shards", "slices", "sequences_per_shard", "eval_records",
                     "eval_max_new_tokens", "layers_per_group", "aggregate"):
            data.pop(name)
        data["target_modules"] = list(self.target_modules)
        data["num_layers"] = num_layers
        data["group_size"] = self.group_size(num_layers)
        return data

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data

    def with_(self, **changes: Any) -> S3TConfig:
        return replace(self, **changes)


def _factorial(n: int) -> int:
    out = 1
    for i in range(2, n + 1):
        out *= i
    return out

"""Bodies of /v1/datasets and /v1/lineages/{name}/finetune."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from service.schemas.common import NonBlank

DatasetName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Text = Annotated[NonBlank, StringConstraints(max_length=100_000)]
Id = Annotated[NonBlank, StringConstraints(max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecordIn(_Strict):
    """One fine-tuning record: a plain `text`, or a `prompt` with its `response`."""

    id: Id
    subject_id: Id | None = Field(None, description="The data subject (person) the record is "
                                                    "about; their records share one shard.")
    text: Text | None = None
    prompt: Text | None = None
    response: Text | None = None

    @model_validator(mode="after")
    def _one_content(self) -> RecordIn:
        chat = self.prompt is not None or self.response is not None
        if chat and (self.prompt is None or self.response is None):
            raise ValueError(f"record {self.id!r}: give both prompt and response")
        if chat == (self.text is not None):
            raise ValueError(f"record {self.id!r}: give either text or prompt/response")
        return self


class DatasetIn(_Strict):
    name: DatasetName
    records: Annotated[list[RecordIn], Field(min_length=1)]


class ShardOut(BaseModel):
    shard: int
    records: int
    slices: dict[str, int] = Field(description="slice -> live records")


class DatasetOut(BaseModel):
    name: str
    records: int = Field(description="Live (not deleted) records.")
    deleted_records: int
    subjects: int
    num_shards: int | None = Field(description="Set by the first fine-tune; null before.")
    num_slices: int | None
    shards: list[ShardOut]
    created_at: datetime


class FinetuneIn(_Strict):
    dataset: DatasetName
    engine: Literal["s3t"] = "s3t"
    shards: int = Field(1, ge=1, le=64, description="Shards (independent models, ensembled); "
                                                   "1 works best on the bundled model.")
    slices: int = Field(2, ge=1, le=16, description="Slices per shard = layer groups.")
    sequences_per_shard: int = Field(2, ge=1, le=24, description="Slice orderings per shard.")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Other S3TConfig fields (workers/engines/s3t/config.py), e.g. "
                    '{"epochs": 12, "lr": 0.003, "layers_per_group": 8}.')

    def engine_options(self) -> dict[str, Any]:
        return {**self.options, "shards": self.shards, "slices": self.slices,
                "sequences_per_shard": self.sequences_per_shard}


class FinetuneOut(BaseModel):
    job_id: uuid.UUID
    ticket_id: uuid.UUID
    lineage: str
    dataset: str
    engine: str
    status: str

"""S3T: exact deletion of fine-tuning records (sharded, sliced, sequence-aware LoRA groups)."""

from workers.engines.registry import register_engine
from workers.engines.s3t.engine import S3TEngine

register_engine(S3TEngine)

__all__ = ["S3TEngine"]

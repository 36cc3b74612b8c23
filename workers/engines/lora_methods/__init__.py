"""The LoRA unlearning methods as engines: idk (the default forget engine before O3), npo,
ga, graddiff."""

from workers.engines.lora_methods.engine import METHOD_TRAITS, LoraMethodEngine
from workers.engines.registry import register_engine

for _method in METHOD_TRAITS:
    register_engine(LoraMethodEngine(_method))

__all__ = ["METHOD_TRAITS", "LoraMethodEngine"]

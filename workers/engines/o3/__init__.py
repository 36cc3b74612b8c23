"""O3: per-request orthogonal LoRA blocks with OOD-gated, per-sample inference.

Importing this package registers the engine (workers/engines/o3/engine.py); torch is only
imported when an engine method runs, so the API can validate o3 tickets cheaply.
"""

from workers.engines.o3 import engine as _engine  # noqa: F401  (registers "o3")

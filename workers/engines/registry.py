"""Engine name -> engine instance; validates what is registered, and is the one table of
which engines exist, which ticket kinds each serves and which engine a kind defaults to.

The API, the dispatcher and the job runner all ask here; nothing else keeps a list of
engine names (storage stores the name it is given).
"""

from __future__ import annotations

from typing import Any

from storage.errors import InvalidRequest

_ENGINES: dict[str, Any] = {}

# The engine a ticket of each kind runs on when it names none. O3 (gated per request) keeps
# unrelated answers where an ungated LoRA (idk) loses them request after request
# (benchmarks/continual.py, README "O3 engine").
DEFAULT_ENGINES: dict[str, str] = {"forget": "o3", "delete_records": "s3t", "finetune": "s3t"}

# Engines announced in DESIGN.md whose implementation has not landed yet: tickets naming
# them are accepted and wait queued (the dispatcher only claims runnable engines). When the
# real engine registers under the same name (its import in `_load_builtin_engines`), the
# placeholder is simply not created.
PLANNED_ENGINES: dict[str, str] = {}


def register_engine(engine: Any) -> Any:
    """Register an engine instance (or class, instantiated with no arguments) by its name.

    Refuses a duplicate name and an object missing part of the Engine shape.
    """
    instance = engine() if isinstance(engine, type) else engine
    name = getattr(instance, "name", None)
    if not (isinstance(name, str) and name.isidentifier()):
        raise TypeError(f"engine {engine!r} needs a `name` that is an identifier")
    missing = [m for m in ("validate", "train", "load_servable", "evaluate")
               if not callable(getattr(instance, m, None))]
    if missing or not getattr(instance, "ticket_kinds", None):
        raise TypeError(f"engine {name!r} lacks {', '.join(missing) or 'ticket_kinds'}")
    if name in _ENGINES:
        raise ValueError(f"engine {name!r} is already registered")
    _ENGINES[name] = instance
    return engine


def get_engine(name: str) -> Any:
    """The engine registered as `name`; InvalidRequest (a 422) naming the known ones."""
    _load_builtin_engines()
    try:
        return _ENGINES[name]
    except KeyError:
        raise InvalidRequest(f"unknown engine {name!r}; choose one of "
                             f"{', '.join(sorted(_ENGINES))}") from None


def list_engines() -> list[str]:
    _load_builtin_engines()
    return sorted(_ENGINES)


def engine_kinds() -> dict[str, frozenset[str]]:
    """Engine name -> the ticket kinds it serves."""
    _load_builtin_engines()
    return {name: frozenset(e.ticket_kinds) for name, e in sorted(_ENGINES.items())}


def is_runnable(engine: Any) -> bool:
    """Whether workers can train this engine now (placeholders of planned engines cannot)."""
    return bool(getattr(engine, "runnable", True))


def runnable_engines() -> list[str]:
    """Engines the dispatcher claims tickets for; tickets of the others stay queued."""
    _load_builtin_engines()
    return sorted(name for name, e in _ENGINES.items() if is_runnable(e))


def resolve_engine(kind: str, engine: str | None) -> str:
    """The engine a ticket of `kind` runs on: `engine`, or the kind's default.

    Raises InvalidRequest for an unknown engine or one that cannot serve `kind`.
    """
    kind = str(getattr(kind, "value", kind))
    if engine is None:
        try:
            return DEFAULT_ENGINES[kind]
        except KeyError:
            raise InvalidRequest(f"unknown ticket kind {kind!r}") from None
    chosen = get_engine(engine)
    if kind not in chosen.ticket_kinds:
        fits = sorted(n for n, kinds in engine_kinds().items() if kind in kinds)
        raise InvalidRequest(f"engine {engine!r} cannot serve a {kind!r} ticket; use one of "
                             f"{', '.join(fits)}")
    return engine


_loaded = False


def _load_builtin_engines() -> None:
    # Importing the engine packages runs their register_engine lines (once).
    # Each engine package is added here when it lands: lora methods, o3, s3t.
    global _loaded
    if _loaded:
        return
    from workers.engines import lora_methods, o3, s3t  # noqa: F401
    from workers.engines.planned import PlannedEngine

    for name, kind in PLANNED_ENGINES.items():
        if name not in _ENGINES:
            register_engine(PlannedEngine(name, kind))
    _loaded = True

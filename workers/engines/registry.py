"""Engine name -> engine instance; validates what is registered."""

from __future__ import annotations

from typing import Any

from storage.errors import InvalidRequest

_ENGINES: dict[str, Any] = {}


def register_engine(engine: Any) -> Any:
    """Register an engine instance (or class, instantiated with no arguments) by its name.

    Refuses a duplicate name and an object missing part of the Engine shape.
    """
    instance = engine() if isinstance(engine, type) else engine
    name = getattr(instance, "name", None)
    if not (isinstance(name, str) and name.isidentifier()):
        raise TypeError(f"engine {engine!r} needs a `name` that is an identifier")
    missing = [m for m in ("validate", "train", "load_servable") if not callable(
        getattr(instance, m, None))]
    if missing or not getattr(instance, "ticket_kinds", None):
        raise TypeError(f"engine {name!r} lacks {', '.join(missing) or 'ticket_kinds'}")
    if name in _ENGINES:
        raise ValueError(f"engine {name!r} is already registered")
    _ENGINES[name] = instance
    return engine


def get_engine(name: str) -> Any:
    _load_builtin_engines()
    try:
        return _ENGINES[name]
    except KeyError:
        raise InvalidRequest(f"unknown engine {name!r}; choose one of "
                             f"{', '.join(sorted(_ENGINES))}") from None


def list_engines() -> list[str]:
    _load_builtin_engines()
    return sorted(_ENGINES)


def _load_builtin_engines() -> None:
    # Importing the engine packages runs their register_engine lines (once, cached).
    # Each engine package is added here when it lands: lora methods, o3, s3t.
    import workers.engines.s3t  # noqa: F401

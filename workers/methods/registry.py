"""A validating registry of unlearning methods: name -> (loss function, config dataclass)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from storage.errors import InvalidRequest


@dataclass(frozen=True)
class Method:
    name: str
    config_cls: type
    loss: Callable[..., Any]
    needs_reference: bool

    def make_config(self, values: dict[str, Any] | None = None) -> Any:
        """Build the config from user values; unknown keys are an error, not ignored."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequest(f"unknown option(s) for method {self.name!r}: "
                                 f"{', '.join(unknown)}; known: {', '.join(sorted(known))}")
        try:
            return self.config_cls(**values)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad options for method {self.name!r}: {exc}") from exc


_METHODS: dict[str, Method] = {}


def register_method(name: str, config_cls: type, *, needs_reference: bool = False
                    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `loss` under `name`; refuses duplicates and configs that are not dataclasses."""
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise TypeError(f"config for method {name!r} must be a dataclass type")

    def decorate(loss: Callable[..., Any]) -> Callable[..., Any]:
        if name in _METHODS:
            raise ValueError(f"unlearning method {name!r} is already registered")
        _METHODS[name] = Method(name, config_cls, loss, needs_reference)
        return loss

    return decorate


def get_method(name: str) -> Method:
    _load_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise InvalidRequest(f"unknown unlearning method {name!r}; "
                             f"known: {', '.join(sorted(_METHODS))}") from None


def list_methods() -> list[str]:
    _load_builtin_methods()
    return sorted(_METHODS)


def _load_builtin_methods() -> None:
    # Importing the modules runs their @register_method lines (once: modules are cached).
    from workers.methods import ga, graddiff, npo  # noqa: F401

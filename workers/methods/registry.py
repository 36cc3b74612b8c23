"""A validating registry of unlearning methods: name -> (loss function, config dataclass).

Every loss has the same keyword-only signature (`MethodLoss`), so the training loop treats
all methods alike: it computes per-example log-probabilities of the forget answers (and of
the frozen reference, if the method asks for them) plus one retain loss, and the method
decides how to combine them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from storage.errors import InvalidRequest

if TYPE_CHECKING:
    from torch import Tensor


class MethodLoss(Protocol):
    def __call__(self, *, forget_logp: Tensor, forget_tokens: Tensor,
                 ref_forget_logp: Tensor | None, retain_loss: Tensor | None,
                 cfg: Any) -> Tensor:
        """The scalar to minimise.

        forget_logp: (B,) summed log-probs of each forget answer under the trained model.
        forget_tokens: (B,) how many answer tokens each sum covers (>= 1).
        ref_forget_logp: (B,) the same under the frozen reference (None unless the method
            was registered with needs_reference=True).
        retain_loss: scalar retain term (NLL or KL, chosen by the job), or None when the job
            has no retain term.
        """
        ...


AnswerFn = Callable[[Any, str, str], str]
"""(cfg, question, answer) -> the answer the forget loss is computed on instead."""


@dataclass(frozen=True)
class Method:
    """A registered unlearning method.

    Args:
        name: registry name (the ticket's `engine` / the recipe's `method`).
        config_cls: frozen dataclass of the method's options, all with defaults.
        loss: the pure loss function (see `MethodLoss`).
        needs_reference: the loss needs the frozen model's log-probs of the forget answers.
        answer_for: if set, each forget QA pair is trained on `answer_for(cfg, q, a)` instead
            of its answer (e.g. a refusal); such methods cannot take plain forget texts.
    """

    name: str
    config_cls: type
    loss: MethodLoss
    needs_reference: bool = False
    answer_for: AnswerFn | None = None

    def option_names(self) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(self.config_cls))

    def make_config(self, values: dict[str, Any] | None = None) -> Any:
        """Build the config from user values; unknown keys are an error, not ignored."""
        values = dict(values or {})
        known = self.option_names()
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidRequest(f"unknown option(s) for method {self.name!r}: "
                                 f"{', '.join(unknown)}; known: {', '.join(sorted(known)) or '-'}")
        try:
            return self.config_cls(**values)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad options for method {self.name!r}: {exc}") from exc


class MethodRegistry:
    """Name -> Method. The process-wide one is `METHODS`; tests may build their own."""

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    def register(self, name: str, config_cls: type, *, needs_reference: bool = False,
                 answer_for: AnswerFn | None = None) -> Callable[[MethodLoss], MethodLoss]:
        """Decorator registering a loss under `name`.

        Refuses a name already taken, a config that is not a frozen dataclass type, and a
        config field without a default (a ticket that gives no options must still work).
        """
        if not name or not name.isidentifier():
            raise ValueError(f"method name {name!r} must be a non-empty identifier")
        if name in self._methods:
            raise ValueError(f"unlearning method {name!r} is already registered")
        if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
            raise TypeError(f"config for method {name!r} must be a dataclass type, "
                            f"got {config_cls!r}")
        if not config_cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            raise TypeError(f"config for method {name!r} must be frozen (@dataclass(frozen=True))")
        missing = [f.name for f in dataclasses.fields(config_cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise TypeError(f"config for method {name!r}: fields without defaults: {missing}")

        def decorate(loss: MethodLoss) -> MethodLoss:
            if name in self._methods:  # registered in between: still a duplicate
                raise ValueError(f"unlearning method {name!r} is already registered")
            self._methods[name] = Method(name, config_cls, loss, needs_reference, answer_for)
            return loss

        return decorate

    def get(self, name: str) -> Method:
        try:
            return self._methods[name]
        except KeyError:
            raise InvalidRequest(f"unknown unlearning method {name!r}; "
                                 f"known: {', '.join(sorted(self._methods))}") from None

    def names(self) -> list[str]:
        return sorted(self._methods)


METHODS = MethodRegistry()


def register_method(name: str, config_cls: type, *, needs_reference: bool = False,
                    answer_for: AnswerFn | None = None) -> Callable[[MethodLoss], MethodLoss]:
    """Register a loss in the process-wide registry (see `MethodRegistry.register`)."""
    return METHODS.register(name, config_cls, needs_reference=needs_reference,
                            answer_for=answer_for)


def get_method(name: str) -> Method:
    _load_builtin_methods()
    return METHODS.get(name)


def list_methods() -> list[str]:
    _load_builtin_methods()
    return METHODS.names()


def _load_builtin_methods() -> None:
    # Importing the modules runs their @register_method lines (once: modules are cached).
    from workers.methods import ga, graddiff, idk, npo  # noqa: F401

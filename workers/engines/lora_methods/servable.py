"""Serving a stacked PEFT LoRA version: one PeftModel per base model, adapters by name.

PEFT injects its LoRA layers into the base model in place, so wrapping the same base twice
would nest adapters. Every servable of one base model therefore goes through one
`PeftHost`, which loads each version as a named adapter and switches between them under a
lock (the active adapter is model state: one generation at a time per base model).
"""

from __future__ import annotations

import itertools
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.evaluation.metrics import StopFn
    from workers.model.token_stream import TokenFn

_HOST_ATTR = "_oblivio_peft_host"  # kept on the model object: it lives exactly as long
_HOSTS_LOCK = threading.Lock()
_NAMES = itertools.count(1)


class PeftHost:
    """The base model, and once the first adapter arrives, the PeftModel around it."""

    def __init__(self, model: Any, tokenizer: Any, device: str) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.peft: Any = None
        self.lock = threading.RLock()

    @classmethod
    def of(cls, model: Any, tokenizer: Any, device: str) -> PeftHost:
        with _HOSTS_LOCK:
            host = getattr(model, _HOST_ATTR, None)
            if host is None:
                host = cls(model, tokenizer, device)
                object.__setattr__(model, _HOST_ATTR, host)
            return host

    def load(self, version_dir: Path) -> str:
        from peft import PeftModel

        name = f"v{next(_NAMES)}"
        with self.lock:
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.model, str(version_dir),
                                                      adapter_name=name)
                self.peft.eval()
            else:
                self.peft.load_adapter(str(version_dir), adapter_name=name)
        return name

    def unload(self, name: str) -> None:
        with self.lock:
            # PEFT cannot delete its last adapter; one stays loaded (and is disabled for
            # base-model answers), the price of one model copy per replica.
            if self.peft is not None and name in self.peft.peft_config \
                    and len(self.peft.peft_config) > 1:
                self.peft.delete_adapter(name)

    def generate(self, adapter: str | None, prompts: list[str], max_new_tokens: list[int],
                 stop: list[StopFn | None] | None = None,
                 on_token: TokenFn | None = None) -> list[str]:
        from workers.evaluation.generation import generate_texts

        with self.lock:
            if adapter is None or self.peft is None:
                model = self.model
                ctx: Any = self.peft.disable_adapter() if self.peft is not None else nullcontext()
            else:
                self.peft.set_adapter(adapter)
                model, ctx = self.peft, nullcontext()
            with ctx:
                return generate_texts(model, self.tokenizer, prompts, max_new_tokens,
                                      device=self.device, stop=stop, on_token=on_token)


class LoraServable:
    """A version (or the base model, `adapter` None) that answers through its host."""

    def __init__(self, host: PeftHost, adapter: str | None) -> None:
        self._host, self.adapter = host, adapter

    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 stop: list[StopFn | None] | None = None,
                 on_token: TokenFn | None = None) -> list[str]:
        return self._host.generate(self.adapter, list(prompts), list(max_new_tokens), stop,
                                   on_token)

    def close(self) -> None:
        if self.adapter is not None:
            self._host.unload(self.adapter)


def load_lora_servable(version_dir: Path | None, *, model: Any, tokenizer: Any,
                       device: str) -> LoraServable:
    host = PeftHost.of(model, tokenizer, device)
    return LoraServable(host, host.load(Path(version_dir)) if version_dir is not None else None)

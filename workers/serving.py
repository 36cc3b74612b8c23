"""Ray Serve deployment that generates with the base model plus one adapter version.

Adapters are multiplexed by their object key: the key is content-addressed and a version is
immutable, so a key names exactly one set of weights forever. The API resolves `lineage` +
`version` (or the `live` alias) to a key on every request, which is why moving `live`
"reloads" serving with no message to the replicas: the next request simply names another key.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from storage.objectstore import StoreConfig

log = logging.getLogger(__name__)

APP_NAME = "oblivio-generate"
BASE_ONLY = "base"  # multiplexed id for requests with no adapter (lineage has no live version)


@dataclass(frozen=True)
class ServingConfig:
    """What a replica needs to load the base model and fetch adapters.

    Args:
        base_model: the base model spec (resolved and cached by workers.model).
        data_dir: where converted models and downloaded adapters are cached.
        store: the object store holding the versions.
        device: `cpu` or `cuda`.
        max_adapters: adapters kept loaded per replica (LRU beyond that).
    """

    base_model: str
    data_dir: str
    store: StoreConfig
    device: str = "cpu"
    max_adapters: int = 4


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
class Generator:
    def __init__(self, config: ServingConfig) -> None:
        from workers.model import load_model_and_tokenizer, resolve_base_model

        self._config = config
        ref = resolve_base_model(config.base_model, Path(config.data_dir))
        self._model, self._tokenizer = load_model_and_tokenizer(ref, device=config.device)
        self._model.eval()
        self._peft: Any = None  # PeftModel wrapping the base once the first adapter arrives
        self._store = config.store.open()
        self._cache = Path(tempfile.mkdtemp(prefix="oblivio-serve-"))
        # PEFT's active adapter is model state: one generation at a time per replica.
        self._lock = threading.Lock()

    @serve.multiplexed(max_num_models_per_replica=4)
    async def _adapter(self, key: str) -> _LoadedAdapter:
        return await asyncio.to_thread(self._load_adapter, key)

    def _load_adapter(self, key: str) -> _LoadedAdapter:
        from peft import PeftModel

        if key == BASE_ONLY:
            return _LoadedAdapter(self, None)
        name = "a" + key.split("/")[1][:16]  # adapters/<sha256>/...
        local = self._cache / name
        if not local.exists():
            self._store.fetch_directory(key, local)  # verifies the checksum
        with self._lock:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._model, str(local), adapter_name=name)
            elif name not in self._peft.peft_config:
                self._peft.load_adapter(str(local), adapter_name=name)
        return _LoadedAdapter(self, name)

    def _unload(self, name: str) -> None:
        with self._lock:
            if self._peft is not None and name in self._peft.peft_config:
                if len(self._peft.peft_config) > 1:
                    self._peft.delete_adapter(name)

    async def generate(self, prompt: str, max_new_tokens: int = 64) -> dict[str, Any]:
        adapter = await self._adapter(serve.get_multiplexed_model_id() or BASE_ONLY)
        text = await self._generate_batched(_Request(adapter.name, prompt, max_new_tokens))
        return {"text": text, "adapter": adapter.name}

    # Concurrent requests are answered together: one batched forward per token serves the
    # whole batch, which on CPU is several times the throughput of one request at a time.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _generate_batched(self, requests: list[_Request]) -> list[str]:
        return await asyncio.to_thread(self._generate_all, requests)

    def _generate_all(self, requests: list[_Request]) -> list[str]:
        """Answers in request order; one generate() call per adapter in the batch."""
        answers: list[str] = [""] * len(requests)
        by_adapter: dict[str | None, list[int]] = {}
        for i, request in enumerate(requests):
            by_adapter.setdefault(request.adapter, []).append(i)
        for adapter, indices in by_adapter.items():
            texts = self._generate(adapter, [requests[i].prompt for i in indices],
                                   [requests[i].max_new_tokens for i in indices])
            for i, text in zip(indices, texts):
                answers[i] = text
        return answers

    def _generate(self, adapter: str | None, prompts: list[str],
                  max_new_tokens: list[int]) -> list[str]:
        import torch

        from workers.model import format_chat

        tok = self._tokenizer
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        side, tok.padding_side = tok.padding_side, "left"  # prompts end where answers start
        try:
            enc = tok([format_chat(tok, p) for p in prompts], return_tensors="pt",
                      padding=True, add_special_tokens=False).to(self._config.device)
        finally:
            tok.padding_side = side
        with self._lock, torch.no_grad():
            if adapter is None or self._peft is None:
                model = self._model
                ctx: Any = self._peft.disable_adapter() if self._peft is not None else _null()
            else:
                self._peft.set_adapter(adapter)
                model, ctx = self._peft, _null()
            with ctx:
                # Greedy decoding: the longest request's answer, cut per request, equals
                # what each would get alone.
                out = model.generate(**enc, max_new_tokens=max(max_new_tokens),
                                     do_sample=False, pad_token_id=pad_id)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        return [tok.decode(row[:n], skip_special_tokens=True).strip()
                for row, n in zip(new_tokens, max_new_tokens)]


@dataclass(frozen=True)
class _Request:
    adapter: str | None  # loaded PEFT adapter name; None = the base model
    prompt: str
    max_new_tokens: int


class _LoadedAdapter:
    """What the multiplexer caches; unloads the PEFT adapter when evicted."""

    def __init__(self, owner: Generator, name: str | None) -> None:
        self._owner, self.name = owner, name

    async def __del__(self) -> None:  # Serve awaits __del__ of evicted multiplexed models
        if self.name is not None:
            self._owner._unload(self.name)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def deploy(config: ServingConfig) -> Any:
    """Start (or update) the generation app on the connected Ray cluster; returns its handle."""
    # Handles only: the API is the one HTTP front door, so no Serve HTTP proxy is started.
    serve.start(proxy_location="Disabled")
    return serve.run(Generator.bind(config), name=APP_NAME, route_prefix=None)


def generate(handle: Any, *, prompt: str, adapter_key: str | None,
             max_new_tokens: int) -> dict[str, Any]:
    """Blocking call through the Serve handle (the API runs it in a thread)."""
    routed = handle.options(multiplexed_model_id=adapter_key or BASE_ONLY)
    return routed.generate.remote(prompt, max_new_tokens).result()

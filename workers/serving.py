"""Ray Serve deployment that generates with the base model plus one version, of any engine.

Adapters are multiplexed by their object key: the key is content-addressed and a version is
immutable, so a key names exactly one set of weights forever. The API resolves `lineage` +
`version` (or the `live` alias) to a key on every request, which is why moving `live`
"reloads" serving with no message to the replicas: the next request simply names another key.
A fetched version's manifest names its engine; `Engine.load_servable` does the rest.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import tempfile
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
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
        resources: Ray resources each replica asks for (WorkerConfig.worker_resources).
    """

    base_model: str
    data_dir: str
    store: StoreConfig
    device: str = "cpu"
    max_adapters: int = 4
    resources: dict[str, float] = field(default_factory=dict)


def generator_app(config: ServingConfig) -> Any:
    """The Generator deployment bound to `config`, its replicas placed by its resources."""
    options = {"num_cpus": 0, "resources": dict(config.resources)}
    return Generator.options(ray_actor_options=options).bind(config)


@serve.deployment(name="Generator", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
class Generator:
    """Serves every engine's versions: each key's manifest names the engine whose
    `load_servable` wraps the base model (one loaded servable per key, LRU)."""

    def __init__(self, config: ServingConfig) -> None:
        from workers.model import load_model_and_tokenizer, resolve_base_model

        self._config = config
        self._base_ref = resolve_base_model(config.base_model, Path(config.data_dir))
        model, self._tokenizer = load_model_and_tokenizer(self._base_ref, device=config.device)
        model.eval()
        # One base model per engine class: an engine may wrap or inject into its model
        # (PEFT does), which must not change what another engine's servables compute;
        # engines of one class (the LoRA methods) wrap it the same way and share it. The
        # first class gets the copy loaded here; another loads its own when it first serves.
        self._spare_model: Any = model
        self._models: dict[str, Any] = {}
        self._models_lock = threading.Lock()
        self._store = config.store.open()
        self._cache = Path(tempfile.mkdtemp(prefix="oblivio-serve-"))
        self._loaded: set[str] = set()  # keys of loaded versions, until evicted

    @serve.multiplexed(max_num_models_per_replica=4)
    async def _servable(self, key: str) -> _LoadedVersion:
        return await asyncio.to_thread(self._load, key)

    def _model_for(self, engine_obj: Any) -> Any:
        from workers.model import load_model_and_tokenizer

        engine = f"{type(engine_obj).__module__}.{type(engine_obj).__qualname__}"
        with self._models_lock:
            if engine not in self._models:
                if self._spare_model is not None:
                    self._models[engine], self._spare_model = self._spare_model, None
                else:
                    model, _ = load_model_and_tokenizer(self._base_ref, device=self._config.device)
                    self._models[engine] = model.eval()
            return self._models[engine]

    def _load(self, key: str) -> _LoadedVersion:
        from workers.engines import get_engine

        if key == BASE_ONLY:
            engine_name, local = _default_engine(), None
        else:
            local = self._cache / ("v" + key.split("/")[1][:16])  # adapters/<sha256>/...
            if not local.exists():
                self._store.fetch_directory(key, local)  # verifies the checksum
            engine_name = manifest_engine(local)
        engine = get_engine(engine_name)
        servable = engine.load_servable(local, model=self._model_for(engine),
                                        tokenizer=self._tokenizer, device=self._config.device,
                                        fetch=self._fetch)
        if key != BASE_ONLY:
            self._loaded.add(key)
        return _LoadedVersion(key, engine_name, servable, on_close=self._loaded.discard)

    def _fetch(self, key: str) -> Path:
        local = self._cache / ("f" + key.replace("/", "_")[-48:])
        if not local.exists():
            self._store.fetch_directory(key, local)
        return local

    def loaded_versions(self) -> list[str]:
        """Object keys of the versions this replica holds loaded now (the base model is
        not one). At most `max_num_models_per_replica`: the multiplexer evicts the least
        recently used beyond that, closing its servable. For tests and operators."""
        return sorted(self._loaded)

    def node_id(self) -> str:
        """The Ray node this replica runs on (for operators and tests)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    async def _acquire(self) -> _LoadedVersion:
        """The request's version (its multiplexed id), loaded and held for it."""
        key = serve.get_multiplexed_model_id() or BASE_ONLY
        loaded = await self._servable(key)
        while not loaded.acquire():  # evicted before this request could hold it: load again
            loaded = await self._servable(key)
        return loaded

    async def generate(self, prompt: str, max_new_tokens: int = 64) -> dict[str, Any]:
        """`{"text", "engine", "usage"}`: the answer, the engine of the version that gave
        it, and its token counts (`prompt_tokens` with the chat template,
        `completion_tokens`)."""
        loaded = await self._acquire()
        tokens = 0

        def count(_token: int) -> None:
            nonlocal tokens
            tokens += 1

        try:
            text = await self._generate_batched(_Request(loaded, prompt, max_new_tokens, count))
        finally:
            loaded.release()
        return {"text": text, "engine": loaded.engine, "usage": self._usage(prompt, tokens)}

    def _usage(self, prompt: str, completion_tokens: int) -> dict[str, int]:
        from workers.model import format_chat

        ids = self._tokenizer(format_chat(self._tokenizer, prompt),
                              add_special_tokens=False)["input_ids"]
        return {"prompt_tokens": len(ids), "completion_tokens": completion_tokens}

    async def generate_stream(self, prompt: str,
                              max_new_tokens: int = 64) -> AsyncIterator[dict[str, Any]]:
        """The answer as it is decoded: `{"engine", "prompt_tokens"}` once the version is
        loaded, then `{"delta": text, "completion_tokens": tokens so far}` pieces whose
        concatenation is exactly what `generate` returns, then `{"completion_tokens"}`
        with the final count (the last tokens may add no text). The running count lets a
        caller that stops reading early (a stop sequence) still say how many tokens were
        decoded.

        The request joins the same batches as `generate`'s (one forward per token for all
        of them); its tokens come back from the decoding thread as they are chosen.
        """
        from workers.model.token_stream import TextDeltas

        loaded = await self._acquire()
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | None] = asyncio.Queue()

        def on_token(token: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        try:
            task = asyncio.ensure_future(
                self._generate_batched(_Request(loaded, prompt, max_new_tokens, on_token)))
        except BaseException:
            loaded.release()
            raise

        def finished(_: Any) -> None:  # released when decoding ends, even if the caller left
            loaded.release()
            tokens.put_nowait(None)

        task.add_done_callback(finished)
        yield {"engine": loaded.engine, "prompt_tokens": self._usage(prompt, 0)["prompt_tokens"]}
        deltas, count = TextDeltas(self._tokenizer), 0
        while (token := await tokens.get()) is not None:
            count += 1
            if piece := deltas.add(token):
                yield {"delta": piece, "completion_tokens": count}
        if rest := deltas.finish(await task):
            yield {"delta": rest, "completion_tokens": count}
        yield {"completion_tokens": count}

    # Concurrent requests are answered together: one batched forward per token serves the
    # whole batch, which on CPU is several times the throughput of one request at a time.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def _generate_batched(self, requests: list[_Request]) -> list[str]:
        return await asyncio.to_thread(self._generate_all, requests)

    def _generate_all(self, requests: list[_Request]) -> list[str]:
        """Answers in request order; one generate() call per loaded version in the batch."""
        answers: list[str] = [""] * len(requests)
        by_version: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            by_version.setdefault(id(request.loaded), []).append(i)
        for indices in by_version.values():
            servable = requests[indices[0]].loaded.servable
            streams = [requests[i].on_token for i in indices]
            kwargs = {}
            if any(streams) and "on_token" in inspect.signature(servable.generate).parameters:
                kwargs["on_token"] = _fan_out(streams)
            texts = servable.generate([requests[i].prompt for i in indices],
                                      [requests[i].max_new_tokens for i in indices], **kwargs)
            for i, text in zip(indices, texts):
                answers[i] = text
        return answers


def _default_engine() -> str:
    # Base-model answers (a lineage with no live version) come from the default forget
    # engine's servable of no version, which is the base model itself.
    from workers.engines.registry import DEFAULT_ENGINES

    return DEFAULT_ENGINES["forget"]


# Versions stored before manifests named their engine were all LoRA versions.
_ENGINE_OF_UNNAMED_VERSIONS = "idk"


def manifest_engine(version_dir: Path) -> str:
    """The engine that made a stored version (its manifest says; older ones were LoRA)."""
    from workers.engines.base import MANIFEST_FILE

    try:
        manifest = json.loads((version_dir / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return _ENGINE_OF_UNNAMED_VERSIONS
    return str(manifest.get("engine") or _ENGINE_OF_UNNAMED_VERSIONS)


@dataclass(frozen=True)
class _Request:
    loaded: _LoadedVersion
    prompt: str
    max_new_tokens: int
    on_token: Callable[[int], None] | None = None  # streamed requests: each new token


def _fan_out(streams: list[Callable[[int], None] | None]) -> Callable[[int, int], None]:
    """A servable's (row, token) calls, to the streamed requests among its batch rows."""
    def on_token(row: int, token: int) -> None:
        if (stream := streams[row]) is not None:
            stream(token)
    return on_token


class _LoadedVersion:
    """What the multiplexer caches. Eviction can come while requests that already hold this
    version wait in the batch queue (more versions in flight than a replica keeps), so the
    servable is closed only when the last of them has generated."""

    def __init__(self, key: str, engine: str, servable: Any,
                 on_close: Any = None) -> None:
        self.key, self.engine, self.servable = key, engine, servable
        self._on_close = on_close
        self._lock = threading.Lock()
        self._users = 0
        self._evicted = self._closed = False

    def acquire(self) -> bool:
        """Hold the version for one request; False once it has been closed."""
        with self._lock:
            if self._closed:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
        self._close_if_unused()

    async def __del__(self) -> None:  # Serve awaits __del__ of evicted multiplexed models
        with self._lock:
            self._evicted = True
        if self._on_close is not None:
            self._on_close(self.key)  # no longer counted as loaded by the multiplexer
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        with self._lock:
            if not self._evicted or self._users or self._closed:
                return
            self._closed = True
        close = getattr(self.servable, "close", None)
        if callable(close):
            close()


def deploy(config: ServingConfig) -> Any:
    """Start (or update) the generation app on the connected Ray cluster; returns its handle."""
    # Handles only: the API is the one HTTP front door, so no Serve HTTP proxy is started.
    serve.start(proxy_location="Disabled")
    return serve.run(generator_app(config), name=APP_NAME, route_prefix=None)


def generate(handle: Any, *, prompt: str, adapter_key: str | None,
             max_new_tokens: int) -> dict[str, Any]:
    """Blocking call through the Serve handle (the API runs it in a thread)."""
    routed = handle.options(multiplexed_model_id=adapter_key or BASE_ONLY)
    return routed.generate.remote(prompt, max_new_tokens).result()


def generate_stream(handle: Any, *, prompt: str, adapter_key: str | None,
                    max_new_tokens: int) -> Any:
    """`Generator.generate_stream` through the Serve handle: a response generator, to be
    iterated (`async for` in the API) and `cancel()`ed when the caller stops reading."""
    routed = handle.options(multiplexed_model_id=adapter_key or BASE_ONLY, stream=True)
    return routed.generate_stream.remote(prompt, max_new_tokens)

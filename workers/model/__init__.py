"""Base model resolution and loading (heavy imports happen inside the functions)."""

from workers.model.base_model import (
    BaseModelRef,
    base_model_on_this_node,
    format_chat,
    load_model_and_tokenizer,
    resolve_base_model,
)

__all__ = ["BaseModelRef", "base_model_on_this_node", "format_chat", "load_model_and_tokenizer", "resolve_base_model"]

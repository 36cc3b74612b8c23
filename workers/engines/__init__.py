"""Unlearning engines, by registry name (see workers/engines/base.py for the shape)."""

from workers.engines.registry import get_engine, list_engines, register_engine

__all__ = ["get_engine", "list_engines", "register_engine"]

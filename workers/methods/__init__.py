"""Unlearning methods: one small module per method, a loss and its documented config.

Losses are pure functions of per-example log-probabilities so they can be tested with
hand-made tensors; the training loop computes those from the model.
"""

from workers.methods.registry import Method, get_method, list_methods, register_method

__all__ = ["Method", "get_method", "list_methods", "register_method"]

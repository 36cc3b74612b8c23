"""Unlearning methods: one small module per method, a loss and its documented config.

Losses are pure functions of per-example log-probabilities (and one retain loss) so they
can be tested with hand-made tensors; the training loop computes those from the model.
Built in: ga, graddiff, npo, idk.
"""

from workers.methods.registry import (
    METHODS,
    Method,
    MethodLoss,
    MethodRegistry,
    get_method,
    list_methods,
    register_method,
)

__all__ = ["METHODS", "Method", "MethodLoss", "MethodRegistry", "get_method", "list_methods",
           "register_method"]

"""Training of unlearning adapters: spec, loop, DeepSpeed strategy, Ray Train runner.

Import from the submodules; this package import stays light (no torch, ray, deepspeed).
"""

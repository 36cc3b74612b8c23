"""Evaluation of unlearning: probe sets, answer checking, forget/utility ratios.

Import what you need from the submodules; this package's import stays free of torch.
`probes` and `metrics` are pure Python; `generation` imports torch inside its functions.
"""

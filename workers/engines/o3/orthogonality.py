"""O3's orthogonality term between a new LoRA block and every earlier one.

Each request's block writes only through the row space of its A matrices; keeping the new
A's rows orthogonal to every earlier block's rows (per module) puts the requests' updates
in separate input subspaces, so training request N disturbs little of what requests 1..N-1
learned, and one block can be dropped later (revocation) without the others leaning on it.

During training the term is added by the training loop's generic regulariser hook
(workers/training/orthogonal.py, fed with the parent version's stacked A matrices: the
Frobenius norm of the stacked product is the sum over the earlier blocks). The functions
here state the term per block and measure it on stored versions (metrics, tests).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from workers.training.orthogonal import orthogonality_penalty as _module_penalty


def orthogonality_penalty(a_old: Iterable[Tensor] | Tensor, a_new: Tensor) -> Tensor:
    """sum_i ||A_i A_new^T||_F^2 for one module.

    a_old: the earlier blocks' A matrices, each (r_i, d_in), or them stacked into one
    (sum r_i, d_in) tensor (same value). a_new: (r_new, d_in).
    """
    olds = [a_old] if isinstance(a_old, Tensor) else list(a_old)
    total = a_new.new_zeros(())
    for a in olds:
        total = total + _module_penalty(a, a_new)
    return total


def stacked_orthogonality_penalty(a_old: Mapping[str, Tensor], a_new: Mapping[str, Tensor]
                                  ) -> Tensor:
    """The term summed over the modules present in both mappings (key -> A)."""
    terms = [orthogonality_penalty(a_old[k], a_new[k]) for k in a_new if k in a_old]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def block_overlap(a_stacked: Mapping[str, Tensor], ranks: list[int], i: int, j: int) -> float:
    """Cosine-normalised overlap of blocks i and j, averaged over modules, in [0, 1].

    ||A_i A_j^T||_F / (||A_i||_F ||A_j||_F): 0 for orthogonal row spaces, 1 for identical
    rank-1 blocks. Unlike the raw penalty it does not depend on the blocks' scale.
    """
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    values = []
    for a in a_stacked.values():
        ai = a[offsets[i]:offsets[i + 1]].float()
        aj = a[offsets[j]:offsets[j + 1]].float()
        denom = ai.norm() * aj.norm()
        if denom > 0:
            values.append(float((ai @ aj.T).norm() / denom))
    return sum(values) / len(values) if values else 0.0

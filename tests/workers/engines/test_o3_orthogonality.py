"""O3's orthogonality term on hand-made tensors, and the training loop's generic hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.engines.o3.orthogonality import (
    block_overlap,
    orthogonality_penalty,
    stacked_orthogonality_penalty,
)
from workers.training.orthogonal import OrthogonalityRegularizer, saved_key


def test_penalty_is_zero_for_orthogonal_rows() -> None:
    a_old = torch.tensor([[1.0, 0.0, 0.0]])
    a_new = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    assert float(orthogonality_penalty([a_old], a_new)) == 0.0


def test_penalty_is_the_squared_frobenius_norm_summed_over_blocks() -> None:
    a1 = torch.tensor([[1.0, 2.0, 0.0]])
    a2 = torch.tensor([[0.0, 1.0, 1.0], [3.0, 0.0, 0.0]])
    a_new = torch.tensor([[1.0, 1.0, 1.0]])
    # A1 A_new^T = [3]; A2 A_new^T = [2, 3]: 9 + 4 + 9.
    assert float(orthogonality_penalty([a1, a2], a_new)) == pytest.approx(22.0)
    # Stacking the earlier blocks gives the same value (the loop uses the stacked parent).
    assert float(orthogonality_penalty(torch.cat([a1, a2]), a_new)) == pytest.approx(22.0)
    both = stacked_orthogonality_penalty({"m1": a1, "m2": a2}, {"m1": a_new, "m2": a_new,
                                                                "m3": a_new})
    assert float(both) == pytest.approx(9.0 + 13.0)  # m3 has no earlier block


def test_gradient_pushes_the_new_rows_out_of_the_old_row_space() -> None:
    a_old = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    a_new = torch.tensor([[1.0, 1.0, 1.0]], requires_grad=True)
    opt = torch.optim.SGD([a_new], lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        orthogonality_penalty(a_old, a_new).backward()
        opt.step()
    # The component along the old rows vanishes, the orthogonal one is untouched.
    assert torch.allclose(a_new.detach(), torch.tensor([[0.0, 0.0, 1.0]]), atol=1e-4)


def test_block_overlap_is_scale_free() -> None:
    a = {"m": torch.tensor([[1.0, 0.0], [0.0, 5.0], [2.0, 0.0]])}
    assert block_overlap(a, [1, 1, 1], 0, 1) == pytest.approx(0.0)
    assert block_overlap(a, [1, 1, 1], 0, 2) == pytest.approx(1.0)


class _WithLora(nn.Module):
    """Module names as PEFT gives them: <module>.lora_A.default is an nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Module()
        self.q_proj.lora_A = nn.ModuleDict({"default": nn.Linear(3, 1, bias=False)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj.lora_A["default"](x)


def test_loop_regularizer_collects_the_term_from_each_forward() -> None:
    model = _WithLora()
    with torch.no_grad():
        model.q_proj.lora_A["default"].weight.copy_(torch.tensor([[1.0, 1.0, 1.0]]))
    assert saved_key("q_proj.lora_A.default") == "q_proj.lora_A.weight"
    reg = OrthogonalityRegularizer({"q_proj.lora_A.weight": torch.tensor([[1.0, 2.0, 0.0]])},
                                   weight=0.5).attach(model)
    assert reg.matched == 1
    model(torch.ones(1, 3))  # outside collecting(): nothing recorded
    with reg.collecting():
        model(torch.ones(1, 3))
    penalty = reg.penalty()
    assert penalty is not None and float(penalty) == pytest.approx(0.5 * 9.0)
    penalty.backward()
    assert model.q_proj.lora_A["default"].weight.grad is not None
    reg.detach()
    with reg.collecting():
        model(torch.ones(1, 3))
    assert reg.penalty() is None

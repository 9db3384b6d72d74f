"""LoRA-FAIR (Bian et al., 2025): FedAvg of A and B, then a server-side correction of B.

With A = sum p_k A_k, B = sum p_k B_k and the ideal update dW = sum p_k B_k A_k, the server finds
dB = argmin 1 - cos(vec((B + dB) A), vec(dW)) + lambda * ||dB||_F by `lora_fair_steps` Adam steps
of rate `lora_fair_lr` from dB = 0 (the paper publishes neither; both are config fields), keeps the
best iterate seen (so the objective never ends above its value at dB = 0), and broadcasts A, B + dB.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies.base import FedAvgModule, Strategy, WeightedMean, register


def fair_objective(dB: Tensor, A: Tensor, B: Tensor, target: Tensor, lam: float) -> Tensor:
    """1 - cos(vec((B + dB) A), vec(target)) + lam * ||dB||_F."""
    approx = ((B + dB) @ A).flatten()
    cos = torch.nn.functional.cosine_similarity(approx, target.flatten(), dim=0, eps=1e-30)
    return 1 - cos + lam * torch.linalg.norm(dB)


def fair_correction(A: Tensor, B: Tensor, target: Tensor, lam: float, steps: int, lr: float) -> Tensor:
    """The residual dB of LoRA-FAIR, solved in float64; the best iterate of `steps` Adam steps."""
    A64, B64, T64 = A.double(), B.double(), target.double()
    dB = torch.zeros_like(B64, requires_grad=True)
    optimizer = torch.optim.Adam([dB], lr=lr)
    best = torch.zeros_like(B64)
    best_value = float(fair_objective(best, A64, B64, T64, lam))
    for _ in range(steps):
        optimizer.zero_grad()
        value = fair_objective(dB, A64, B64, T64, lam)
        value.backward()
        optimizer.step()
        with torch.no_grad():
            current = float(fair_objective(dB, A64, B64, T64, lam))
            if current < best_value:
                best, best_value = dB.detach().clone(), current
    return best.to(B.dtype)


class LoraFairModule(FedAvgModule):
    """FedAvg of both factors plus the running ideal update sum p_k B_k A_k (dense, one per module)."""

    def __init__(self, strategy: Strategy, state: GlobalState, module: str) -> None:
        super().__init__(strategy, state, module)
        self.ideal = WeightedMean()

    def accept(self, A: Optional[Tensor], B: Optional[Tensor], weight: float) -> None:
        super().accept(A, B, weight)
        self.ideal.add(B.double() @ A.double(), weight)

    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        A, B = self.averaged()
        c = self.strategy.config
        dB = fair_correction(A, B, self.ideal.value(torch.float64), c.lora_fair_lambda, c.lora_fair_steps, c.lora_fair_lr)
        return A, B + dB, None


@register
class LoraFAIR(Strategy):
    name = "lora_fair"
    paper = "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and Initialization Refinement (Bian et al., ICCV 2025)"
    module_aggregator_cls = LoraFairModule

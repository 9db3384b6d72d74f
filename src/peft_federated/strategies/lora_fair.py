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
    """The residual dB of LoRA-FAIR, solved in float64; the best iterate of `steps` Adam steps.

    `fair_objective` without a d_out x d_in product per step: the target enters only as T A^T and
    ||T||, since <(B + dB) A, T> = <B + dB, T A^T> and ||(B + dB) A||^2 = <(B + dB) A A^T, B + dB>."""
    A64, T64 = A.double(), target.double()
    B64, TA, G, t = B.double(), T64 @ A64.T, A64 @ A64.T, torch.linalg.norm(T64)

    def objective(dB: Tensor) -> Tensor:
        X = B64 + dB
        norm = ((X @ G) * X).sum().clamp_min(0).sqrt()
        return 1 - (X * TA).sum() / (norm * t).clamp_min(1e-30) + lam * torch.linalg.norm(dB)

    dB = torch.zeros_like(B64, requires_grad=True)
    optimizer = torch.optim.Adam([dB], lr=lr)
    best, best_value = torch.zeros_like(B64), float("inf")
    for step in range(steps + 1):  # the objective of dB = 0, then of each step's iterate
        value = objective(dB)
        if (current := value.item()) < best_value:
            best, best_value = dB.detach().clone(), current
        if step == steps:
            break
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
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
    dp_refusal = "Its correction targets mean(B_k A_k), a product of each client's factors, whose change clipping does not bound."
    module_aggregator_cls = LoraFairModule

"""FedEx-LoRA (Singhal et al., 2025): FedAvg of A and B plus the exact residual folded into the base.

R = sum p_k B_k A_k - B A with A, B the averages (as published); W0 <- W0 + s R, so
W0' + s B A = W0 + s sum p_k B_k A_k exactly. R = sum_k p_k (B_k - B)(A_k - A) has rank <= (K-1) r
(in every dtype: directions at the averages' rounding level are dropped) and is kept as low-rank
factors, never as a dense d_out x d_in matrix.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies.base import FedAvgModule, Strategy, register
from peft_federated.strategies.stacking import WeightedStack


class FedExModule(FedAvgModule):
    def __init__(self, strategy: Strategy, state: GlobalState, module: str) -> None:
        super().__init__(strategy, state, module)
        self.products = WeightedStack()

    def accept(self, A: Optional[Tensor], B: Optional[Tensor], weight: float) -> None:
        super().accept(A, B, weight)
        self.products.add(B, A, weight)

    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        A, B = self.averaged()
        # B and A were rounded to their dtype: directions at that level are rounding, not residual.
        residual = self.products.mean().concat(LowRank(-B.double(), A.double())).compressed(A.dtype)
        return A, B, residual


@register
class FedExLoRA(Strategy):
    name = "fedex"
    paper = "Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation Models (Singhal et al., ACL 2025)"
    dp_refusal = "Its residual mean(B_k A_k) - mean(B) mean(A) is a product of each client's factors, whose change clipping does not bound."
    exact = True
    module_aggregator_cls = FedExModule

"""FedSVD (NeurIPS 2025): freeze A, average B, and re-factor B A by SVD so that A stays orthonormal.

Every client freezes the global lora_A, trains lora_B and uploads only lora_B. A is the same on
every client, so the server's weighted average of B is exact: B A = sum_k p_k B_k A. Then, every
`fedsvd_period` rounds, the server takes the SVD B A = U S V^T and publishes A = V_r^T (orthonormal
rows, the next rounds' frozen A), B = U_r S_r: the product, hence the global model, is unchanged,
B^T B = S_r^2 is diagonal and non-increasing, and the next clients train B against an A whose rows
follow the directions the federation has learnt.

Round 0 is as for every method here: A from `init_seed` (not orthonormal), B = 0. Its B A = 0 has no
singular directions, so the initial state is not re-factored; the first refactoring comes after the
first round, on the average of B. Should the product still be 0 then (no client moved B), A is kept
as it is; should it have rank k < r, A's last r - k rows are its own rows made orthonormal to the
first k (`svd_factors`), with B's columns there 0.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies.base import FedAvgModule, Strategy, register
from peft_federated.strategies.svd import svd_factors


class FedSVDModule(FedAvgModule):
    """FedAvg of B (A is frozen, so not uploaded), then on refactoring rounds the SVD of B A."""

    def __init__(self, strategy: Strategy, state: GlobalState, module: str) -> None:
        super().__init__(strategy, state, module)
        self.refactors = strategy.refactors(state.round)

    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        A, B = self.averaged()
        if not self.refactors:
            return A, B, None
        A, B = svd_factors(LowRank(B, A), A, B.dtype)
        return A, B, None


@register
class FedSVD(Strategy):
    name = "fedsvd"
    paper = ("FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA "
             "(Lee et al., NeurIPS 2025)")
    exact = True
    module_aggregator_cls = FedSVDModule

    def trainable_factors(self, round: int) -> tuple[str, ...]:
        return ("lora_B",)

    def refactors(self, round: int) -> bool:
        """Whether aggregating `round` (0-indexed) ends with the SVD: after every `fedsvd_period` rounds."""
        return (round + 1) % self.config.fedsvd_period == 0

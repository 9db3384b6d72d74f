"""FlexLoRA (Bai et al., NeurIPS 2024): heterogeneous ranks aggregated as full-size updates, then split by SVD.

Client k keeps a fixed rank r_k (`client_ranks`), starts each round from the global factors
truncated to r_k, trains A and B, and uploads both. The server forms dW = sum_k p_k s B_k A_k
(p_k: sample-count or uniform weights, summing to 1), takes its SVD U S V^T and publishes
A = V_r^T, B = U_r S_r / s: all singular values go to B. So each client's truncation to its rank is
the truncated SVD of dW at that rank (Eckart-Young: the best rank-r_k approximation); what lies
beyond r is lost every round.

Scale: the paper gives each client its own LoRA scale s_k = alpha / r_k and divides by s_r after the
SVD. Here every client trains a rank-mask truncation of the rank-r model at the federation's one
scale s (as HetLoRA does), so dW = s sum p_k B_k A_k and the s cancels: the same functions are
represented, and the clients of low rank differ from the paper's only in the effective learning
rate (gradients scaled by s instead of s_k).

Memory: dW is never dense. The server keeps the stacked weighted factors sum_k p_k B_k A_k
(`WeightedStack`), whose rank is sum_k r_k until it passes min(d_out, d_in), where it is recompressed
exactly; so per module it holds at most (d_out + d_in)(min(d_out, d_in) + r) numbers, about two
dense matrices, however many clients take part; the SVD works on those factors (QR, then a small SVD).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies.base import ModuleAggregator, Strategy, register
from peft_federated.strategies.stacking import WeightedStack
from peft_federated.strategies.svd import svd_factors


class FlexLoRAModule(ModuleAggregator):
    """The weighted mean of the clients' products B_k A_k, kept as stacked factors, split by SVD at rank r."""

    def __init__(self, strategy: Strategy, state: GlobalState, module: str) -> None:
        super().__init__(strategy, state, module)
        self.products = WeightedStack()

    def accept(self, A: Optional[Tensor], B: Optional[Tensor], weight: float) -> None:
        self.products.add(B, A, weight)

    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        A, B = svd_factors(self.products.mean(), self.A0, self.B0.dtype)
        return A, B, None


@register
class FlexLoRA(Strategy):
    name = "flexlora"
    paper = ("Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client Resources "
             "(Bai et al., NeurIPS 2024)")
    dp_refusal = "It averages each client's product B_k A_k, whose change clipping the factors does not bound."
    module_aggregator_cls = FlexLoRAModule

    def client_rank(self, state: GlobalState, client_id: str) -> int:
        return self.config.client_rank(client_id)

"""HetLoRA (Cho et al., 2024): clients of different ranks share one global adapter of rank r.

Client k trains the truncation A[:r_k], B[:, :r_k] (at the global scale s, so a truncation is the
same function restricted to fewer ranks). A regulariser pushes the tail ranks beyond
floor(gamma * r_k) towards zero; if the tail's ||A_tail|| * ||B_tail|| shrank over the round, the
client self-prunes to max(r_min, floor(gamma * r_k)). The server zero-pads every update to r and
weights it per module by p_k = ||B_k A_k||_F / sum_j ||B_j A_j||_F (sparsity-weighted aggregation);
sample counts do not enter. Each client's rank is kept in the strategy state for the next round.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from peft_federated import adapter
from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies.base import ClientRound, ModuleAggregator, Strategy, WeightedMean, register


def pad_rank(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad lora_A (rows) and lora_B (columns) up to `rank`."""
    A_pad = torch.zeros(rank, A.shape[1], dtype=A.dtype)
    B_pad = torch.zeros(B.shape[0], rank, dtype=B.dtype)
    A_pad[: A.shape[0]], B_pad[:, : B.shape[1]] = A, B
    return A_pad, B_pad


class HetLoRAModule(ModuleAggregator):
    """Zero-pad to the global rank, average with weights proportional to ||B_k A_k||_F."""

    def __init__(self, strategy: Strategy, state: GlobalState, module: str) -> None:
        super().__init__(strategy, state, module)
        self.mean_A, self.mean_B = WeightedMean(), WeightedMean()

    def accept(self, A: Optional[Tensor], B: Optional[Tensor], weight: float) -> None:
        norm = float(torch.linalg.norm(B.double() @ A.double()))
        A_pad, B_pad = pad_rank(A, B, self.A0.shape[0])
        self.mean_A.add(A_pad, norm)
        self.mean_B.add(B_pad, norm)

    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        if self.mean_A.total == 0:  # every client's B_k A_k is zero: nothing to weight by, keep the global
            return self.A0, self.B0, None
        return self.mean_A.value(self.A0.dtype), self.mean_B.value(self.B0.dtype), None


@register
class HetLoRA(Strategy):
    name = "hetlora"
    paper = "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models (Cho et al., EMNLP 2024)"
    dp_refusal = "It weighs each client by ||B_k A_k||, a function of its data, so one client can take any share of the mean."
    module_aggregator_cls = HetLoRAModule

    def client_rank(self, state: GlobalState, client_id: str) -> int:
        return state.strategy_state.get("client_ranks", {}).get(client_id, self.config.client_rank(client_id))

    def allowed_ranks(self, state: GlobalState, client_id: str) -> range:
        rank = self.client_rank(state, client_id)
        return range(min(self.config.hetlora_min_rank, rank), rank + 1)

    def pruned_rank(self, rank: int) -> int:
        """The rank a client drops to when its tail shrank."""
        return max(self.config.hetlora_min_rank, math.floor(self.config.hetlora_gamma * rank))

    def tail_norm(self, client_round: ClientRound) -> Tensor:
        """sum over modules of ||A[t:r_k]||_F * ||B[:, t:r_k]||_F, t = floor(gamma * r_k); differentiable."""
        start, stop = math.floor(self.config.hetlora_gamma * client_round.rank), client_round.rank
        total = torch.zeros((), dtype=torch.float64)
        for layer in adapter.lora_layers(client_round.model).values():
            name = layer.active_adapters[0]
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            total = total + (torch.linalg.norm(A[start:stop]) * torch.linalg.norm(B[:, start:stop])).double().cpu()
        return total

    def on_client_start(self, client_round: ClientRound) -> None:
        with torch.no_grad():
            client_round.info["tail_norm_start"] = float(self.tail_norm(client_round))

    def regularizer(self, client_round: ClientRound) -> Optional[Tensor]:
        if self.config.hetlora_reg == 0:
            return None
        return self.config.hetlora_reg * self.tail_norm(client_round)

    def upload_rank(self, client_round: ClientRound) -> int:
        with torch.no_grad():
            end = float(self.tail_norm(client_round))
        client_round.info["tail_norm_end"] = end
        shrank = end < client_round.info["tail_norm_start"]
        return self.pruned_rank(client_round.rank) if shrank else client_round.rank

    def next_strategy_state(self, state: GlobalState, clients: dict[str, dict]) -> dict:
        ranks = dict(state.strategy_state.get("client_ranks", {}))
        ranks.update({client_id: info["rank"] for client_id, info in clients.items()})
        return {**state.strategy_state, "client_ranks": ranks}

"""FLoRA (Wang et al., 2024): stack the clients' fresh adapters and merge them into the base.

Every round each client starts a fresh LoRA (lora_A drawn from `init_seed`, the round and its id;
lora_B = 0) at its own rank on top of the merged base. The server stacks A = [p_1 A_1; ...; p_K A_K]
and B = [B_1 ... B_K], so s * B A = s * sum p_k B_k A_k exactly, and merges that into the base
change. All clients train at the global scale s (ranks are truncations of r), so the stacked adapter
keeps the clients' scale; the published adapter's alpha_pattern keeps s at the stacked rank.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from peft_federated import adapter
from peft_federated.state import GlobalState, LowRank, lora_key
from peft_federated.strategies.base import ModuleAggregator, Strategy, register
from peft_federated.strategies.stacking import WeightedStack


class FLoRAModule(ModuleAggregator):
    def __init__(self, strategy: Strategy, state: GlobalState, module: str) -> None:
        super().__init__(strategy, state, module)
        self.stack = WeightedStack()

    def accept(self, A: Optional[Tensor], B: Optional[Tensor], weight: float) -> None:
        self.stack.add(B, A, weight)

    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        return self.A0, torch.zeros_like(self.B0), self.stack.mean()


@register
class FLoRA(Strategy):
    name = "flora"
    paper = "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations (Wang et al., NeurIPS 2024)"
    dp_refusal = "It stacks every client's factors into the adapter as they are, with no mean for the noise to hide a client in."
    exact = True
    module_aggregator_cls = FLoRAModule

    def client_rank(self, state: GlobalState, client_id: str) -> int:
        return self.config.client_rank(client_id)

    def client_start(self, state: GlobalState, client_id: str, rank: int) -> dict[str, Tensor]:
        out = dict(state.tensors)
        for module in state.modules():
            a, b = lora_key(module, "lora_A"), lora_key(module, "lora_B")
            d_in, d_out = out[a].shape[1], out[b].shape[0]
            out[a] = adapter.init_lora_A((rank, d_in), self.config.init_seed, module, state.round, client_id, dtype=out[a].dtype)
            out[b] = torch.zeros(d_out, rank, dtype=out[b].dtype)
        return out

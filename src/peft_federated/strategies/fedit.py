"""FedIT: FedAvg of both LoRA factors (Zhang et al., 2024). The baseline; not exact, since
mean(B) @ mean(A) != mean(B_k @ A_k) in general."""

from peft_federated.strategies.base import Strategy, register


@register
class FedIT(Strategy):
    name = "fedit"
    paper = "Towards Building the Federated GPT: Federated Instruction Tuning (Zhang et al., ICASSP 2024)"

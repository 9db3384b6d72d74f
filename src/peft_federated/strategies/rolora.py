"""RoLoRA (Chen et al., 2024): alternate which factor the federation trains.

Round 2t (0-indexed) every client freezes the global lora_A and trains lora_B; round 2t+1 it
freezes lora_B and trains lora_A. Clients always start from the global factors, the frozen one is
bit-identical everywhere, so each average is exact, and each client uploads only the active factor.
"""

from peft_federated.strategies.base import Strategy, register


@register
class RoLoRA(Strategy):
    name = "rolora"
    paper = "Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA (Chen et al., 2024)"
    exact = True

    def trainable_factors(self, round: int) -> tuple[str, ...]:
        return ("lora_B",) if round % 2 == 0 else ("lora_A",)

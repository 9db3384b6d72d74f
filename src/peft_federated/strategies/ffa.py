"""FFA-LoRA (Sun et al., 2024): lora_A is drawn once from the shared `init_seed` and never trains;
clients train and upload lora_B only (half of FedIT's uplink), so averaging B is exact."""

from peft_federated.strategies.base import Strategy, register


@register
class FFALoRA(Strategy):
    name = "ffa"
    paper = "Improving LoRA in Privacy-preserving Federated Learning (Sun et al., ICLR 2024)"
    exact = True

    def trainable_factors(self, round: int) -> tuple[str, ...]:
        return ("lora_B",)

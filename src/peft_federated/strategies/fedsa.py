"""FedSA-LoRA (Guo et al., ICLR 2025): share lora_A, keep lora_B.

Every client trains both factors from the global lora_A and its own lora_B, and uploads only lora_A;
the server averages it (sample-count or uniform weights) and broadcasts it. lora_B and the extra
trainable tensors (`modules_to_save`: the classification head) are personal: each client keeps its
own between rounds and they never leave it, as in the authors' config (local parameters lora_B and
the classifier). A client's model is the global A with its own B and head; the paper evaluates each
client so, on its own test split, and reports the unweighted mean over clients.

Round 0 is as for every method here: A from `init_seed`, B = 0. The published rounds hold the shared
A and keep round 0's B = 0 and head, so plain PEFT loads a round as the shared part alone (the base
model); each client's personal part loads over it (`peft_federated.load_personal`). A client without
personal tensors yet (its first round, or it joins late) starts from those published values: B = 0,
the initial head, i.e. the shared model; the paper does not say, this is the natural choice.

Under client-level DP only the uploaded A is clipped and noised: the published mean of A is a plain
DP-FedAvg mean, and nothing personal is published.
"""

from peft_federated.strategies.base import Strategy, register


@register
class FedSALoRA(Strategy):
    name = "fedsa"
    paper = "Selective Aggregation for Low-Rank Adaptation in Federated Learning (Guo et al., ICLR 2025)"
    personal_factors = ("lora_B",)
    personal_extras = True

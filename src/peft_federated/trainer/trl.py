"""TRL trainers with federated rounds: `FederatedSFTTrainer` (needs `trl`).

Any other TRL trainer gets the same behaviour the same way: `class X(FederatedMixin, DPOTrainer)`.
"""

from __future__ import annotations

from trl import SFTTrainer

from peft_federated.trainer.trainer import FederatedMixin


class FederatedSFTTrainer(FederatedMixin, SFTTrainer):
    """TRL's `SFTTrainer` training a federated client's rounds. Pass a PeftModel built from
    `federated_config.to_lora_config()` as `model` (not `peft_config=`): the federation owns the adapter."""

    _tag_names = ["trl", "sft", "peft-federated"]

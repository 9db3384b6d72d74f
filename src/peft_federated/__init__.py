"""peft-federated: federated LoRA fine-tuning on the Hugging Face stack."""

from peft_federated.config import FederatedLoraConfig
from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies import STRATEGIES, InvalidUpdateError, Strategy, get_strategy

__version__ = "0.1.0"

# Trainers load transformers (and TRL) only when first used, as `from peft_federated import FederatedTrainer`.
_LAZY = {
    "FederatedTrainer": "peft_federated.trainer.trainer",
    "FederatedMixin": "peft_federated.trainer.trainer",
    "run_simulation": "peft_federated.trainer.simulation",
    "SimulationResult": "peft_federated.trainer.simulation",
    "FederatedSFTTrainer": "peft_federated.trainer.trl",
    "FederatedDPOTrainer": "peft_federated.trainer.trl",
    "LocalStore": "peft_federated.hub_integration.store",
    "HubStore": "peft_federated.hub_integration.hub_store",
    "load_personal": "peft_federated.personal",
}
__all__ = ["FederatedLoraConfig", "GlobalState", "InvalidUpdateError", "LowRank", "STRATEGIES", "Strategy", "get_strategy", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'peft_federated' has no attribute {name!r}")

"""peft-federated: federated LoRA fine-tuning on the Hugging Face stack."""

from peft_federated.config import FederatedLoraConfig
from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies import STRATEGIES, InvalidUpdateError, Strategy, get_strategy

__version__ = "0.1.0"
__all__ = ["FederatedLoraConfig", "GlobalState", "InvalidUpdateError", "LowRank", "STRATEGIES", "Strategy", "get_strategy"]

"""Aggregation strategies, one module per algorithm, registered by lowercase name."""

from peft_federated.strategies.base import (
    STRATEGIES,
    Aggregator,
    ClientRound,
    FedAvgModule,
    ModuleAggregator,
    Strategy,
    WeightedMean,
    get_strategy,
    register,
)
from peft_federated.strategies.fedex import FedExLoRA
from peft_federated.strategies.fedit import FedIT
from peft_federated.strategies.fedsa import FedSALoRA
from peft_federated.strategies.fedsvd import FedSVD
from peft_federated.strategies.ffa import FFALoRA
from peft_federated.strategies.flexlora import FlexLoRA
from peft_federated.strategies.flora import FLoRA
from peft_federated.strategies.hetlora import HetLoRA
from peft_federated.strategies.lora_fair import LoraFAIR
from peft_federated.strategies.rolora import RoLoRA
from peft_federated.strategies.validation import InvalidUpdateError, check_update

__all__ = [
    "STRATEGIES", "Aggregator", "ClientRound", "FedAvgModule", "FedExLoRA", "FedIT", "FedSALoRA", "FedSVD", "FFALoRA", "FlexLoRA",
    "FLoRA", "HetLoRA", "InvalidUpdateError", "LoraFAIR", "ModuleAggregator", "RoLoRA", "Strategy", "WeightedMean",
    "check_update", "get_strategy", "register",
]

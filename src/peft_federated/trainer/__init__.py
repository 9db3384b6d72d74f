"""FederatedTrainer (a transformers.Trainer), a mixin for TRL trainers, and in-process simulation."""

from peft_federated.trainer.simulation import SimulationResult, run_simulation, sample_clients
from peft_federated.trainer.trainer import FederatedMixin, FederatedTrainer

__all__ = ["FederatedMixin", "FederatedTrainer", "SimulationResult", "run_simulation", "sample_clients"]

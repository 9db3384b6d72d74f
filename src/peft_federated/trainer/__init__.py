"""FederatedTrainer (a transformers.Trainer), a mixin for TRL trainers, TRL's SFT and DPO trainers
with federated rounds (imported with TRL on first use), and in-process simulation."""

from peft_federated.trainer.simulation import SimulationResult, round_clients, run_simulation, sample_clients
from peft_federated.trainer.trainer import FederatedMixin, FederatedTrainer

_TRL = ("FederatedDPOTrainer", "FederatedSFTTrainer")
__all__ = ["FederatedMixin", "FederatedTrainer", "SimulationResult", "round_clients", "run_simulation", "sample_clients", *_TRL]


def __getattr__(name: str):
    if name in _TRL:  # TRL is a heavy import: only when a TRL trainer is asked for
        from peft_federated.trainer import trl

        return getattr(trl, name)
    raise AttributeError(f"module 'peft_federated.trainer' has no attribute {name!r}")

"""Flower as the engine (the `flower` extra: `pip install peft-federated[flower]`).

- `FederatedLoraStrategy`: any of our strategies as a Flower `Strategy` (Message API), each round run
  by our aggregator (`aggregate_round`: validation, refusals with reasons, norm bounds, DP), optionally
  publishing every round to a `RoundStore` (LocalStore or HubStore) as plain PEFT adapters.
- `client_app`: a Flower `ClientApp` that trains each round with `FederatedTrainer` or any
  `FederatedMixin` trainer, one base model per process.

    strategy = FederatedLoraStrategy(config, store="runs/flower")
    strategy.start(grid, strategy.initial_arrays(model))      # in a ServerApp's @app.main()
    app = client_app(model_fn, trainer_fn)                      # the ClientApp

Only this package imports flwr; the rest of peft_federated works without it.
"""

try:
    import flwr  # noqa: F401
except ImportError as err:  # pragma: no cover - the extra is missing
    raise ImportError("peft_federated.flower needs Flower: pip install 'peft-federated[flower]'") from err

from peft_federated.flower.client import client_app, node_client_id
from peft_federated.flower.records import config_from_json, config_to_json, from_arrays, read_round, round_content, to_arrays
from peft_federated.flower.strategy import QUERY_CLIENT_ID, FederatedLoraStrategy

__all__ = [
    "FederatedLoraStrategy", "QUERY_CLIENT_ID", "client_app", "config_from_json", "config_to_json", "from_arrays",
    "node_client_id", "read_round", "round_content", "to_arrays",
]

"""Where rounds live: the layout shared by the local folder store and Hub repos, and both stores."""

from peft_federated.hub_integration.hub_store import HubStore, HubStoreError
from peft_federated.hub_integration.layout import CorruptRoundError, read_round, write_round
from peft_federated.hub_integration.store import LocalStore, RoundAlreadyPublishedError, RoundStore, check_client_id

__all__ = [
    "CorruptRoundError", "HubStore", "HubStoreError", "LocalStore", "RoundAlreadyPublishedError", "RoundStore", "check_client_id", "read_round",
    "write_round",
]

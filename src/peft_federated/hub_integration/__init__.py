"""Where rounds live: the on-disk layout shared by the local folder store and Hub repos."""

from peft_federated.hub_integration.layout import CorruptRoundError, read_round, write_round
from peft_federated.hub_integration.store import LocalStore, RoundAlreadyPublishedError, RoundStore, check_client_id

__all__ = [
    "CorruptRoundError", "LocalStore", "RoundAlreadyPublishedError", "RoundStore", "check_client_id", "read_round",
    "write_round",
]

"""Test helpers: a Hub-compatible server on loopback for exercising the real huggingface_hub client."""

from typing import Any

__all__ = ["HubError", "HubServer", "Storage"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `python -m peft_federated.testing.hub_server` does not import the module twice.
    if name == "HubServer":
        from peft_federated.testing.hub_server import HubServer

        return HubServer
    if name in ("HubError", "Storage"):
        from peft_federated.testing import hub_storage

        return getattr(hub_storage, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

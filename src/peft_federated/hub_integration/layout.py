"""The files of one published round, the same in a local folder and in a Hub repo.

    adapter_model.safetensors   the global adapter, loadable with plain PEFT (see `peft_federated.state`)
    adapter_config.json         a plain LoraConfig (rank/alpha patterns only where the base changed)
    federation.json             round, strategy and its state, rank, contributions, metrics
    README.md                   the model card (written by the store)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peft_federated.config import alpha_for_scale
from peft_federated.state import GlobalState, from_peft_adapter, to_peft_adapter

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FEDERATION = "federation.json"
FORMAT_VERSION = 1


class CorruptRoundError(ValueError):
    """A round's files are missing, truncated or malformed."""


def pattern_key(module: str) -> str:
    """The rank_pattern / alpha_pattern key of exactly `module` (its path in the base model). PEFT reads
    keys as regular expressions matched against a module path's dotted suffixes, first match wins: a
    bare `fc` would also match `sub.fc`. Anchored, the key matches the whole path and nothing else."""
    return f"^{re.escape(module)}$"


def write_round(folder: str | Path, state: GlobalState, config: "FederatedLoraConfig", metadata: dict | None = None) -> Path:
    """Write a round's adapter, adapter config and federation metadata into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, ranks = to_peft_adapter(state, config.r)
    lora_config = config.to_lora_config(
        rank_pattern={pattern_key(m): r for m, r in ranks.items()},
        alpha_pattern={pattern_key(m): alpha_for_scale(config.scaling, r, config.use_rslora) for m, r in ranks.items()},
        inference_mode=True,
    )
    for name, value in vars(lora_config).items():  # PEFT keeps module names in sets: write them in one order
        if isinstance(value, (set, frozenset)):
            setattr(lora_config, name, sorted(value))
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    lora_config.save_pretrained(str(folder))
    meta = {
        "format_version": FORMAT_VERSION,
        "round": state.round,
        "rank": config.r,
        "strategy": config.strategy,
        "strategy_state": state.strategy_state,
        "federation": config.federation_dict(),
        **(metadata or {}),
    }
    (folder / FEDERATION).write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False))  # strict JSON
    return folder


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The federation.json of a round folder, checked."""
    path = Path(folder) / FEDERATION
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptRoundError(f"{path} is missing: {folder} is not a published round.") from None
    except json.JSONDecodeError as err:
        raise CorruptRoundError(f"{path} is not valid JSON ({err}); re-fetch or re-publish the round.") from None
    for key, kind in (("round", int), ("rank", int), ("strategy", str)):
        if not isinstance(meta.get(key), kind):
            raise CorruptRoundError(f"{path}: field {key!r} is missing or not a {kind.__name__}.")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CorruptRoundError(f"{path} has format_version {meta['format_version']}; upgrade peft-federated to read it.")
    return meta


def load_safetensors(path: str | Path) -> dict:
    """Load a safetensors file, turning a truncated or corrupt file into a `CorruptRoundError`."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CorruptRoundError(f"{path} is missing.") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptRoundError(f"{path} is not a readable safetensors file ({err}); it may be truncated.") from None


def read_round(folder: str | Path) -> tuple[GlobalState, dict[str, Any]]:
    """The global state and metadata of a round folder."""
    meta = read_metadata(folder)
    tensors, base_delta = from_peft_adapter(load_safetensors(Path(folder) / ADAPTER_WEIGHTS), meta["rank"])
    state = GlobalState(meta["round"], tensors, base_delta, meta.get("strategy_state", {}))
    return state, meta

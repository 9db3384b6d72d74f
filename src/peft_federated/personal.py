"""A client's personal tensors: what it trains but keeps for itself under a personalized strategy.

A strategy declares what is personal (`Strategy.personal_factors`, `Strategy.personal_extras`:
FedSA-LoRA's lora_B and classification head). Each client keeps its own, in its own folder, never in
an upload; the published rounds hold only the shared part. On disk, one folder per client:

    <personal_dir>/<client id>/round-NNNN/personal.safetensors   PEFT's adapter keys (lora_B of each module, the head)
                                         /personal.json          client id, strategy, round NNNN, federation

`round-NNNN` holds the tensors the client starts round NNNN with, i.e. those it ended round NNNN - 1
with: together with the published round NNNN (or a later one, if it missed rounds) they make its
personalized model. The trainer writes one after each round it trains, before the update is
submitted (a temporary folder renamed into place: never half-written), and keeps the one it started
from too, so a client restarted before its update was submitted trains that round again from the same
tensors. A client without any (its first round, or it joins late) starts from the published round's
values: B = 0 and round 0's head, i.e. the shared model.

A client folder belongs to one federation: give a new federation a new output folder (or
`personal_dir`). Tensors that do not fit the federation (other keys, shapes or dtypes, another client,
strategy or store: `RoundStore.federation`, a Hub repo id or a local store's path, where the trainer
has a store) are refused with the reason, never loaded.

Load a personalized model with plain PEFT and `load_personal`:

    model = PeftModel.from_pretrained(base, "<round folder or repo>", revision="round-0010")  # shared part
    load_personal(model, "<output_dir>/personal/<client id>")  # this client's lora_B and head over it
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from safetensors.torch import save_file
from torch import Tensor

from peft_federated.hub_integration.layout import load_safetensors
from peft_federated.hub_integration.store import check_client_id
from peft_federated.strategies.validation import all_finite

if TYPE_CHECKING:
    from peft import PeftModel

    from peft_federated.state import GlobalState
    from peft_federated.strategies import Strategy

WEIGHTS = "personal.safetensors"
META = "personal.json"
FORMAT_VERSION = 1
_ROUND = re.compile(r"round-(\d{4,})")


class PersonalTensorsError(ValueError):
    """Personal tensors on disk that do not belong to this client, strategy or model."""


def client_folder(personal_dir: str | os.PathLike, client_id: str) -> Path:
    """The folder of one client's personal tensors."""
    return Path(personal_dir) / check_client_id(client_id)


def snapshot_rounds(folder: str | os.PathLike) -> list[int]:
    """The rounds a client folder holds personal tensors for, ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for p in folder.iterdir() if (m := _ROUND.fullmatch(p.name)) and (p / META).is_file())


def latest_snapshot(folder: str | os.PathLike, round: Optional[int] = None) -> Optional[int]:
    """The latest round (at most `round`) a client folder holds personal tensors for, or None."""
    rounds = [r for r in snapshot_rounds(folder) if round is None or r <= round]
    return rounds[-1] if rounds else None


def _snapshot(folder: Path, round: int) -> Path:
    return folder / f"round-{round:04d}"


def read_snapshot(folder: str | os.PathLike, round: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and personal.json of a client folder's snapshot for `round`."""
    where = _snapshot(Path(folder), round)
    try:
        meta = json.loads((where / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PersonalTensorsError(f"{where / META} cannot be read ({err}): delete {where} (the client then starts "
                                   "that round from its previous personal tensors, or from the shared model).") from None
    if not isinstance(meta, dict) or meta.get("round") != round or meta.get("format_version", 0) > FORMAT_VERSION:
        raise PersonalTensorsError(f"{where / META} is not a personal-tensors record of round {round} this version reads.")
    try:
        tensors = load_safetensors(where / WEIGHTS)
    except ValueError as err:
        raise PersonalTensorsError(f"{err} Delete {where} to start that round from the previous personal tensors.") from None
    return tensors, meta


def check_personal(tensors: dict[str, Tensor], state: "GlobalState", strategy: "Strategy", source: str) -> None:
    """Refuse personal tensors that do not fit `strategy`'s personal part of `state`: exactly its keys,
    with the global shapes and dtypes, all finite."""
    expected = strategy.personal_keys(state)
    unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    hint = "They belong to another federation or model: give this one another personal_dir (or delete them)."
    if unknown or missing:
        raise PersonalTensorsError(f"{source}: {'unexpected ' + str(unknown[:3]) if unknown else ''}"
                                   f"{' and ' if unknown and missing else ''}{'missing ' + str(missing[:3]) if missing else ''} "
                                   f"among the personal tensors of {strategy.name}. {hint}")
    for key in expected:
        value, reference = tensors[key], state.tensors[key]
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise PersonalTensorsError(f"{source}: {key} is {value.dtype} {tuple(value.shape)}, the federation's is "
                                       f"{reference.dtype} {tuple(reference.shape)}. {hint}")
        if not all_finite(value):
            raise PersonalTensorsError(f"{source}: {key} holds NaN or Inf values; delete that folder.")


def read_personal(folder: str | os.PathLike, state: "GlobalState", strategy: "Strategy", client_id: str,
                  federation: Optional[str] = None) -> tuple[Optional[int], Optional[dict[str, Tensor]]]:
    """(round, tensors) of the latest snapshot a client can start `state.round` from (the latest at most
    `state.round`), checked against the federation (`federation`: its store's, where both sides know
    it); (None, None) when there is none."""
    round = latest_snapshot(folder, state.round)
    if round is None:
        return None, None
    tensors, meta = read_snapshot(folder, round)
    source = str(_snapshot(Path(folder), round))
    if meta.get("client_id") != client_id or meta.get("strategy") != strategy.name:
        raise PersonalTensorsError(f"{source} holds the personal tensors of client {meta.get('client_id')!r} under "
                                   f"{meta.get('strategy')!r}, not of {client_id!r} under {strategy.name!r}: give each "
                                   "client and federation its own personal_dir.")
    if federation is not None and meta.get("federation") not in (None, federation):
        raise PersonalTensorsError(f"{source} holds personal tensors of the federation {meta['federation']!r}, not of "
                                   f"{federation!r}: give this federation its own personal_dir (or output folder), or "
                                   "delete that folder.")
    check_personal(tensors, state, strategy, source)
    return round, tensors


def write_personal(folder: str | os.PathLike, round: int, tensors: dict[str, Tensor], strategy: "Strategy",
                   client_id: str, keep_from: Optional[int] = None, federation: Optional[str] = None) -> Path:
    """Write a client's personal tensors as the snapshot it starts `round` with (atomically), then remove
    the snapshots before `keep_from` (the one this round started from: kept, for a restart before the
    update is submitted) and any after `round` (another federation's). `federation`: the store's
    (`RoundStore.federation`), recorded. Returns the snapshot's folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = _snapshot(folder, round)
    tmp = Path(tempfile.mkdtemp(prefix=".personal-", dir=folder))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        meta = {"format_version": FORMAT_VERSION, "client_id": client_id, "strategy": strategy.name, "round": round,
                "trained_round": round - 1, "keys": sorted(tensors), "federation": federation}
        (tmp / META).write_text(json.dumps(meta, indent=2))
        if target.exists():  # this round trained again (a restart before its update was submitted)
            shutil.rmtree(target)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for other in snapshot_rounds(folder):
        if other > round or (other < round and (keep_from is None or other < keep_from)):
            shutil.rmtree(_snapshot(folder, other), ignore_errors=True)
    for left in folder.glob(".personal-*"):  # a write killed before its rename
        shutil.rmtree(left, ignore_errors=True)
    return target


def clear_personal(folder: str | os.PathLike) -> None:
    """Remove every snapshot of a client folder (a new federation starts without personal tensors)."""
    for round in snapshot_rounds(folder):
        shutil.rmtree(_snapshot(Path(folder), round), ignore_errors=True)


def load_personal(model: "PeftModel", folder: str | os.PathLike, round: Optional[int] = None) -> dict[str, Any]:
    """Load a client's personal tensors over the shared round `model` holds (e.g. a published round
    loaded with `PeftModel.from_pretrained`), making it that client's personalized model.

    `folder`: a client folder (`<personal_dir>/<client id>`: its latest snapshot, or the latest at most
    `round`) or one snapshot folder (`.../round-NNNN`). Pair the snapshot of round NNNN with the
    published round NNNN, or a later one if the client missed rounds. Each tensor must match the shape
    and dtype the model has. Returns the snapshot's personal.json."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    folder = Path(folder)
    if (m := _ROUND.fullmatch(folder.name)) and (folder / META).is_file():
        tensors, meta = read_snapshot(folder.parent, int(m[1]))
    else:
        found = latest_snapshot(folder, round)
        if found is None:
            raise FileNotFoundError(f"{folder} holds no personal tensors{'' if round is None else f' up to round {round}'}: "
                                    "give a client folder (<personal_dir>/<client id>) or one of its round-NNNN folders.")
        tensors, meta = read_snapshot(folder, found)
    current = get_peft_model_state_dict(model)
    for key, value in tensors.items():
        if key not in current:
            raise PersonalTensorsError(f"The model has no {key}: load the federation's round (plain PEFT) into it first.")
        if current[key].shape != value.shape:
            raise PersonalTensorsError(f"{key} is {tuple(value.shape)} in {folder} but {tuple(current[key].shape)} in the "
                                       "model: load a round of the same federation.")
    result = set_peft_model_state_dict(model, {k: v.to(current[k].dtype) for k, v in tensors.items()})
    if getattr(result, "unexpected_keys", []):
        raise PersonalTensorsError(f"The model did not take {result.unexpected_keys[:3]} from {folder}.")
    return meta


__all__ = [
    "PersonalTensorsError", "check_personal", "clear_personal", "client_folder", "latest_snapshot", "load_personal",
    "read_personal", "read_snapshot", "snapshot_rounds", "write_personal",
]

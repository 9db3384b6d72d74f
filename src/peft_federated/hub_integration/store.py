"""Where rounds live. `RoundStore` is the interface; `LocalStore` is the embedded default.

A local store mirrors the Hub layout on disk:

    <root>/rounds/round-NNNN/    one published round (a Hub tag): a plain PEFT adapter folder
    <root>/LATEST                the latest round's number (the Hub's `main`)
    <root>/updates/<client>/round-NNNN/update.safetensors + update.json   a client's submission

A round is written to a temporary folder and renamed into place, so it is never seen half-written
and can be published only once; an update is written the same way.

Reading an update verifies it before anything uses it: both files' sizes (`max_bytes`, `max_meta_bytes`,
before reading), its update.json (strict JSON, an object: `update_meta`), its bytes against the recorded
sha256, and a readable safetensors file; each failure is a ValueError naming the client and round, which
the aggregator records as a refusal. `committed_at` says when the store received an update (for copies).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from safetensors.torch import save as save_bytes
from torch import Tensor

from peft_federated.hub_integration.layout import CorruptRoundError, load_safetensors, read_round, write_round
from peft_federated.hub_integration.model_card import write_model_card
from peft_federated.hub_integration.update_meta import parse_update_json, too_large
from peft_federated.state import GlobalState

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig

_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class RoundAlreadyPublishedError(RuntimeError):
    """Another aggregator published this round first; re-read the store instead of publishing again."""


class StoreUnavailableError(ConnectionError):
    """The store itself kept failing (not a client's files): the aggregator stops; rerun once it is back."""


def check_client_id(client_id: str) -> str:
    """A client id is a plain name: letters, digits, '.', '_' and '-', no path characters."""
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id) or ".." in client_id:
        raise ValueError(
            f"Invalid client id {client_id!r}: use 1-96 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/', '\\' or '..')."
        )
    return client_id


def serialize_update(tensors: dict[str, Tensor]) -> bytes:
    """An update as the safetensors bytes a client uploads (what its sha256 is taken over)."""
    return save_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def update_sha256(tensors: dict[str, Tensor]) -> str:
    return hashlib.sha256(serialize_update(tensors)).hexdigest()


def update_record(round: int, client_id: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """What a client stores for an update: the safetensors bytes, and its update.json record (the
    client's `meta` plus round, client id and the sha256 of those bytes). Shared by every store."""
    data = serialize_update(tensors)
    return data, {**meta, "round": round, "client_id": check_client_id(client_id), "sha256": hashlib.sha256(data).hexdigest()}


def check_update_bytes(data: bytes, meta: dict[str, Any], round: int, client_id: str) -> None:
    """Refuse an update whose bytes do not match the sha256 recorded in its update.json."""
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise ValueError(f"Update of {client_id!r} for round {round} does not match its recorded sha256 (changed or "
                         "corrupted after its update.json was written); the client must resubmit it.")


def check_update_file(path: Path, meta: dict[str, Any], round: int, client_id: str, chunk: int = 2**20) -> None:
    """`check_update_bytes` for an update file, hashed in chunks through one reused buffer: no copy of
    the whole file in memory (which costs more than the hash itself)."""
    digest, buf = hashlib.sha256(), bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    if digest.hexdigest() != meta.get("sha256"):
        raise ValueError(f"Update of {client_id!r} for round {round} does not match its recorded sha256 (changed or "
                         "corrupted after its update.json was written); the client must resubmit it.")


def check_update_size(size: int, max_bytes: Optional[int], round: int, client_id: str) -> None:
    """Refuse an update file larger than `max_bytes` (the federation's `max_update_bytes`) before reading it."""
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"Update of {client_id!r} for round {round} is {size} bytes, above max_update_bytes={max_bytes}: "
                         "refused unread. An update holds only the round's LoRA factors; raise max_update_bytes if "
                         "the federation's adapters really are that large.")


def crash_point(point: str, round: int) -> None:
    """Test hook: SIGKILL this process at `point` ("before-commit" or "after-commit", i.e. between a
    round's commit and its tag) of publishing `round` when PEFT_FEDERATED_CRASH_AT is "<point>:<round>".
    It reaches moments a kill from outside cannot hit reliably; unset, it does nothing."""
    if os.environ.get("PEFT_FEDERATED_CRASH_AT") == f"{point}:{round}":
        os.kill(os.getpid(), signal.SIGKILL)


def load_update(path: Path, round: int, client_id: str) -> dict[str, Tensor]:
    """An update file's tensors; a truncated or corrupt file is refused with a ValueError naming the client."""
    try:
        return load_safetensors(path)
    except CorruptRoundError as err:
        raise ValueError(f"Update of {client_id!r} for round {round}: {err} The client must resubmit it.") from None


def round_name(round: int) -> str:
    return f"round-{round:04d}"


class RoundStore(ABC):
    """Published global rounds and the clients' submitted updates."""

    @abstractmethod
    def latest_round(self) -> Optional[int]:
        """The number of the latest published round, or None before the first."""

    @abstractmethod
    def read_round(self, round: Optional[int] = None) -> tuple[GlobalState, dict[str, Any]]:
        """A published round's state and metadata (the latest by default)."""

    @abstractmethod
    def history(self) -> list[dict[str, Any]]:
        """The metadata (federation.json) of every published round, oldest first."""

    @abstractmethod
    def publish_round(self, state: GlobalState, config: "FederatedLoraConfig", metadata: dict[str, Any]) -> str:
        """Publish `state` as round `state.round`; raise RoundAlreadyPublishedError if it exists."""

    @abstractmethod
    def submit_update(self, round: int, client_id: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
        """Store a client's update for `round`; returns its sha256."""

    @abstractmethod
    def list_updates(self, round: int) -> list[str]:
        """Ids of the clients that submitted an update for `round`."""

    @abstractmethod
    def update_file(self, round: int, client_id: str, max_bytes: Optional[int] = None,
                    max_meta_bytes: Optional[int] = None) -> tuple[Path, dict[str, Any]]:
        """A local path to a submitted update's safetensors file, checked against the sha256 in its
        metadata, and that metadata. An update file above `max_bytes`, or an update.json above
        `max_meta_bytes`, is refused (ValueError) before it is read or downloaded; so is one that does
        not match its sha256."""

    def committed_at(self, round: int, client_id: str) -> Optional[float]:
        """When the store received the update that `update_file` last returned for this client and round
        (seconds since the epoch, as the store itself recorded it), or None if the store cannot say."""
        return None

    def read_update(self, round: int, client_id: str, max_bytes: Optional[int] = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """A submitted update's tensors and metadata (see `update_file`)."""
        path, meta = self.update_file(round, client_id, max_bytes)
        return load_update(path, round, client_id), meta

    def round_folder(self, round: int) -> Path:
        """A local folder holding a published round's files (adapter_config.json, federation.json, ...)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose round folders.")

    @property
    def federation(self) -> Optional[str]:
        """Which federation this store holds, as a client's personal tensors record it (a local store's
        absolute path, a Hub repo id), or None where the store cannot say."""
        return None


class LocalStore(RoundStore):
    """Rounds and updates in a local folder, with the Hub's layout (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self._committed: dict[tuple[int, str], float] = {}
        (self.root / "rounds").mkdir(parents=True, exist_ok=True)
        (self.root / "updates").mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def federation(self) -> str:
        return str(self.root.resolve())

    def round_path(self, round: int) -> Path:
        return self.root / "rounds" / round_name(round)

    def round_folder(self, round: int) -> Path:
        if not self.round_path(round).is_dir():
            raise FileNotFoundError(f"Round {round} is not published in {self.root} (latest: {self.latest_round()}).")
        return self.round_path(round)

    def latest_round(self) -> Optional[int]:
        try:
            return int((self.root / "LATEST").read_text().strip())
        except FileNotFoundError:
            return None

    def read_round(self, round: Optional[int] = None) -> tuple[GlobalState, dict[str, Any]]:
        if round is None:
            round = self.latest_round()
            if round is None:
                raise FileNotFoundError(f"{self.root} holds no published round yet; publish round 0 first.")
        path = self.round_path(round)
        if not path.is_dir():
            raise FileNotFoundError(f"Round {round} is not published in {self.root} (latest: {self.latest_round()}).")
        return read_round(path)

    def history(self) -> list[dict[str, Any]]:
        latest = self.latest_round()
        return [] if latest is None else [json.loads((self.round_path(r) / "federation.json").read_text()) for r in range(latest + 1)]

    def publish_round(self, state: GlobalState, config: "FederatedLoraConfig", metadata: dict[str, Any]) -> str:
        target = self.round_path(state.round)
        if target.exists():
            raise RoundAlreadyPublishedError(f"Round {state.round} is already published at {target}.")
        latest = self.latest_round()
        expected = 0 if latest is None else latest + 1
        if state.round != expected:
            raise ValueError(f"Cannot publish round {state.round}: the next round in {self.root} is {expected}.")
        tmp = Path(tempfile.mkdtemp(prefix=".publish-", dir=self.root))
        try:
            write_round(tmp, state, config, metadata)
            write_model_card(tmp, config, self.history() + [json.loads((tmp / "federation.json").read_text())])
            os.rename(tmp, target)  # atomic; fails if another aggregator renamed first
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            if target.exists():
                raise RoundAlreadyPublishedError(f"Round {state.round} was published concurrently at {target}.") from err
            raise
        _atomic_write(self.root / "LATEST", str(state.round))
        return str(target)

    def _update_dir(self, round: int, client_id: str) -> Path:
        return self.root / "updates" / check_client_id(client_id) / round_name(round)

    def submit_update(self, round: int, client_id: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
        target = self._update_dir(round, client_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        data, record = update_record(round, client_id, tensors, meta)
        tmp = Path(tempfile.mkdtemp(prefix=".submit-", dir=target.parent))
        (tmp / "update.safetensors").write_bytes(data)
        (tmp / "update.json").write_text(json.dumps(record, indent=2))
        if target.exists():  # a resubmission replaces the earlier one for this round
            shutil.rmtree(target)
        os.rename(tmp, target)
        return record["sha256"]

    def list_updates(self, round: int) -> list[str]:
        updates = self.root / "updates"
        return sorted(p.name for p in updates.iterdir() if (p / round_name(round) / "update.json").is_file())

    def update_file(self, round: int, client_id: str, max_bytes: Optional[int] = None,
                    max_meta_bytes: Optional[int] = None) -> tuple[Path, dict[str, Any]]:
        folder = self._update_dir(round, client_id)
        weights = _regular_file(folder / "update.safetensors", round, client_id)
        check_update_size(weights.st_size, max_bytes, round, client_id)
        size = _regular_file(folder / "update.json", round, client_id).st_size
        if max_meta_bytes is not None and size > max_meta_bytes:
            raise too_large(size, max_meta_bytes, round, client_id)
        with open(folder / "update.json", "rb") as f:  # bounded even if the file grows after the check
            data = f.read(max_meta_bytes + 1 if max_meta_bytes is not None else -1)
        meta = parse_update_json(data, round, client_id, max_meta_bytes)
        check_update_file(folder / "update.safetensors", meta, round, client_id)
        # ctime: when the file last changed on this file system; unlike mtime, no client can set it back
        self._committed[(round, client_id)] = weights.st_ctime
        return folder / "update.safetensors", meta

    def committed_at(self, round: int, client_id: str) -> Optional[float]:
        return self._committed.get((round, client_id))


def _regular_file(path: Path, round: int, client_id: str) -> os.stat_result:
    """A submitted file's stat, refused unless it is a regular file (no link, folder, device or pipe)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise ValueError(f"Update of {client_id!r} for round {round}: {path.name} is "
                         f"{'missing' if st is None else 'not a regular file'}; the client must resubmit its update.")
    return st


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

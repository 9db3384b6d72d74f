"""`HubStore`: a federation's rounds and updates in Hugging Face Hub repos (the interface of `LocalStore`).

    <repo_id>, e.g. "org/federation"     written by the aggregator only; clients only read it
        main                           the latest round: adapter_model.safetensors, adapter_config.json
                                       (a plain LoraConfig), federation.json, README.md (the model card)
        tag round-NNNN                 one commit per round; plain PEFT loads it with
                                       `PeftModel.from_pretrained(base, repo_id, revision="round-0003")`
    a client's updates repo            written by that client only; read by the aggregator
        round-NNNN/update.safetensors  the update, under PEFT's tensor names
        round-NNNN/update.json         round, client_id, base_round, base_commit (the global commit it
                                       trained from), num_samples, metrics, sha256 of the safetensors bytes

A client's updates repo is `client_repos[client_id]` if given (e.g. in the client's own namespace),
else "<repo_id>-updates-<client_id>". The store finds a round's updates by asking each known client's
repo (`clients`, `client_repos`) for that round's file; it never lists the Hub.

`update_file(..., max_bytes=, max_meta_bytes=)` reads both files' sizes and last commits from the Hub's
metadata (paths-info) and refuses a larger file before downloading it; the commit's date is
`committed_at`, the Hub's own record of when the client submitted (what orders copies).

`publish_round` commits on the head of main it read (`parent_commit`), then tags the commit. A round
is published once tagged. Only the federation's own chain of rounds counts (`latest_round`,
`read_round`, `history`): tags round-0000, round-0001, ... with no gap, each tag's federation.json
naming its round and each round's commit descending from the previous round's. A tag outside that
chain (say a forged round-0007) is reported and ignored. If another aggregator committed first the Hub
answers 412: `RoundAlreadyPublishedError`. A commit on main that is not the latest round's is tagged
only if it is exactly the round this publisher would commit (same files, on the latest round's
commit): the commit of a publisher that died before tagging it. Anything else on main (e.g. a
collaborator's federation.json claiming another round) is reported in the log and in the next round's
`replaced_head`, never tagged, and the round is committed on top of it, its stray files deleted.

Connection errors, timeouts and HTTP 408/429/5xx are retried with exponential backoff for up to
`retry_timeout` seconds, then `HubUnavailableError`; other failures raise a `HubStoreError` that says
what to do: `HubPermissionError` (401/403, naming the token, its user and the repo),
`HubRepoNotFoundError`, `RoundNotPublishedError`.

On huggingface.co: leave HF_ENDPOINT unset and give each party a token (`token=`, HF_TOKEN or
`hf auth login`). The aggregator's token must write the global repo and read the updates repos; a
client's must read the global repo and write its own updates repo (a fine-grained token, or a repo in
its own namespace via `client_repos`). Repos are created public unless `private=True` (a private
updates repo must stay readable by the aggregator). Other endpoints: `endpoint=` or HF_ENDPOINT.
Restarting a federation from scratch: use a new repo name, as updates left from an earlier run carry
that run's base commit and are refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, RepositoryNotFoundError
from huggingface_hub.utils import validate_repo_id
from torch import Tensor

from peft_federated.hub_integration.layout import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, FEDERATION, read_metadata, read_round, write_round,
)
from peft_federated.hub_integration.model_card import write_model_card
from peft_federated.hub_integration.store import (
    RoundAlreadyPublishedError, RoundStore, StoreUnavailableError, check_client_id, check_update_file, check_update_size,
    crash_point, round_name, update_record,
)
from peft_federated.hub_integration.update_meta import parse_update_json, too_large
from peft_federated.state import GlobalState

try:  # exactly the transport errors huggingface_hub itself retries (its HTTP library's connection/timeout errors)
    from huggingface_hub.utils._http import _DEFAULT_RETRY_ON_EXCEPTIONS as _TRANSPORT_ERRORS
except ImportError:  # pragma: no cover - other huggingface_hub versions
    _TRANSPORT_ERRORS = (ConnectionError, TimeoutError)

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")
ROUND_FILES = (ADAPTER_WEIGHTS, ADAPTER_CONFIG, FEDERATION)
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_TAG = re.compile(r"^round-(\d{4,})$")
SETTLE_SECONDS = 2.0  # how long a publisher waits before treating an untagged commit on main as foreign


class HubStoreError(RuntimeError):
    """A Hub request failed for a reason that retrying will not fix; the message says what to do."""


class HubPermissionError(HubStoreError, PermissionError):
    """The Hub refused the token (401) or the token's user may not do this on the repo (403)."""


class HubRepoNotFoundError(HubStoreError, FileNotFoundError):
    """The repo does not exist, or is private and the token may not read it."""


class RoundNotPublishedError(HubStoreError, FileNotFoundError):
    """The requested round has no tag in the global repo (yet)."""


class HubUnavailableError(HubStoreError, StoreUnavailableError):
    """The Hub kept failing with transient errors for `retry_timeout` seconds."""


class _StaleParentError(HubStoreError):
    """HTTP 412: main moved since the publisher read it (handled inside `publish_round`)."""


def _causes(err: Optional[BaseException]) -> Iterator[BaseException]:
    while err is not None:
        yield err
        err = err.__cause__


def _status(err: BaseException) -> tuple[Optional[HfHubHTTPError], Optional[int]]:
    """The first Hub HTTP error in `err`'s chain of causes, and its status code."""
    http = next((e for e in _causes(err) if isinstance(e, HfHubHTTPError)), None)
    response = getattr(http, "response", None)
    return http, getattr(response, "status_code", None)


def _transient(err: BaseException) -> bool:
    http, status = _status(err)
    if http is not None:
        return status in RETRY_STATUS
    return any(isinstance(e, _TRANSPORT_ERRORS) and not isinstance(e, OfflineModeIsEnabled) for e in _causes(err))


class HubStore(RoundStore):
    """Rounds in the Hub repo `repo_id`, each client's updates in its own repo (see the module docstring).

    Args:
        repo_id: the global repo, "namespace/name".
        clients: ids of the federation's clients (whose updates repos the store looks into).
        client_repos: client id -> its updates repo, for clients not using "<repo_id>-updates-<client_id>".
        token: Hub token (default: HF_TOKEN or the saved login). endpoint: Hub URL (default: HF_ENDPOINT or huggingface.co).
        cache_dir: huggingface_hub cache for downloads (default: the usual HF cache).
        private: create repos private. retry_timeout: seconds to keep retrying transient failures.
    """

    def __init__(self, repo_id: str, clients: Iterable[str] = (), client_repos: Optional[Mapping[str, str]] = None, *,
                 token: Optional[str] = None, endpoint: Optional[str] = None, cache_dir: Optional[str | Path] = None,
                 private: bool = False, retry_timeout: float = 120.0) -> None:
        _check_repo_id(repo_id, "repo_id")
        self.api = HfApi(endpoint=endpoint, token=token)
        self.repo_id, self.endpoint = repo_id, self.api.endpoint
        self.client_repos = {check_client_id(c): _check_repo_id(r, f"client_repos[{c!r}]") for c, r in (client_repos or {}).items()}
        self.clients = sorted({check_client_id(c) for c in clients} | set(self.client_repos))
        owners: dict[str, str] = {}
        for c in self.clients:
            repo = self.update_repo(c)
            if repo == repo_id:
                raise ValueError(f"client_repos[{c!r}] is the global repo {repo_id!r}: a client's updates go to a repo "
                                 "of their own, which only that client writes.")
            if repo in owners:
                raise ValueError(f"Clients {owners[repo]!r} and {c!r} would both write updates to {repo!r}: give each "
                                 "client its own updates repo (client_repos).")
            owners[repo] = c
        self.cache_dir, self.private, self.retry_timeout = cache_dir, private, retry_timeout
        self._tags: dict[int, str] = {}  # round -> commit of its tag, on the federation's chain; tags never move
        self._reported: set[tuple[str, str]] = set()  # (tag or commit, why) already logged
        self._committed: dict[tuple[int, str], float] = {}
        self._created: set[str] = set()
        self._said_missing = False

    def __repr__(self) -> str:
        return f"HubStore({self.repo_id!r}, endpoint={self.endpoint!r})"

    @property
    def federation(self) -> str:
        return self.repo_id  # not the endpoint: the same repo may be reached through another address

    def update_repo(self, client_id: str) -> str:
        """The repo a client's updates go to."""
        return self.client_repos.get(check_client_id(client_id)) or f"{self.repo_id}-updates-{client_id}"

    # ---- global rounds --------------------------------------------------------------------------
    def latest_round(self) -> Optional[int]:
        return max(self._rounds(), default=None)

    def round_folder(self, round: int) -> Path:
        """The round's files in the local huggingface_hub cache (downloaded at its tag's commit)."""
        commit = self._commit(round)
        return [self._download(self.repo_id, name, commit) for name in ROUND_FILES][0].parent

    def read_round(self, round: Optional[int] = None) -> tuple[GlobalState, dict[str, Any]]:
        if round is None:
            round = self.latest_round()
            if round is None:
                raise RoundNotPublishedError(f"{self.repo_id!r} on {self.endpoint} holds no published round yet; "
                                             "the aggregator publishes round 0 first.")
        return read_round(self.round_folder(round))

    def history(self) -> list[dict[str, Any]]:
        return [self._metadata(r) for r in range(max(self._rounds(), default=-1) + 1)]

    def publish_round(self, state: GlobalState, config: "FederatedLoraConfig", metadata: dict[str, Any]) -> str:
        """Commit the round on top of the head of main that was read, then tag it; returns the commit id."""
        if state.round == 0:
            self._call("create", self.repo_id, self.api.create_repo, self.repo_id, private=self.private, exist_ok=True)
        sighted = None
        for _ in range(4):
            rounds = self._rounds()
            head = self._head()
            if head != rounds.get(max(rounds, default=None)):  # a round tagged since the tags were read counts too
                rounds = self._rounds()
            latest = max(rounds, default=None)
            if latest is not None and latest >= state.round:
                raise RoundAlreadyPublishedError(f"Round {state.round} is already published in {self.repo_id!r} "
                                                 f"(its latest round is {latest}).")
            expected = 0 if latest is None else latest + 1
            if state.round != expected:
                raise ValueError(f"Cannot publish round {state.round}: the next round in {self.repo_id} is {expected}.")
            with tempfile.TemporaryDirectory(prefix="peft-federated-round-") as tmp:
                self._write(tmp, state, config, metadata)
                stray: list[str] = []
                if head != rounds.get(latest):
                    why = self._not_this_round(head, rounds.get(latest), Path(tmp))
                    if why is None:  # main holds exactly this round: its publisher died before tagging it
                        self._tag(state.round, head)
                        raise RoundAlreadyPublishedError(f"Round {state.round} was already committed to {self.repo_id!r} "
                                                         f"({head}); its tag is now in place.")
                    if why and sighted != head:  # perhaps another aggregator between its commit and its tag
                        sighted = head
                        time.sleep(SETTLE_SECONDS)
                        continue
                    if why:
                        self._report(head, f"main of {self.repo_id!r} holds commit {head} that is not round {state.round} "
                                     f"of this federation ({why}): it is not tagged; round {state.round} is committed on top")
                        self._write(tmp, state, config, {**metadata, "replaced_head": {"commit": head, "reason": why}})
                        stray = self._stray_files(head, Path(tmp))
                ops = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in sorted(Path(tmp).iterdir())]
                ops += [CommitOperationDelete(path_in_repo=name) for name in stray]
                crash_point("before-commit", state.round)
                try:
                    commit = self._call(f"publish round {state.round} to", self.repo_id, self.api.create_commit,
                                        self.repo_id, ops, commit_message=f"Round {state.round}", parent_commit=head)
                except _StaleParentError:
                    logger.info("main of %s moved while publishing round %d; re-reading it", self.repo_id, state.round)
                    continue
            crash_point("after-commit", state.round)
            self._tag(state.round, commit.oid)
            return commit.oid
        raise HubStoreError(f"main of {self.repo_id!r} kept moving while round {state.round} was being published: "
                            "is another process committing to the global repo? Only the aggregator should.")

    def _head(self) -> str:
        """main's commit."""
        return self._call("read", self.repo_id, self.api.repo_info, self.repo_id).sha

    def _write(self, folder: str, state: GlobalState, config: "FederatedLoraConfig", metadata: dict[str, Any]) -> None:
        write_round(folder, state, config, metadata)
        history = [self._metadata(r) for r in range(state.round)] + [read_metadata(folder)]
        write_model_card(folder, config, history, repo_id=self.repo_id)

    def _not_this_round(self, head: str, base: Optional[str], folder: Path) -> Optional[str]:
        """None if commit `head` is exactly the round in `folder` committed on `base` (the latest round's
        commit); "" if `head` is the repo's first commit and no round exists yet; else why it is not."""
        commits = [c.commit_id for c in self._call("read the history of", self.repo_id, self.api.list_repo_commits,
                                                   self.repo_id, revision=head)]
        if base is None and len(commits) == 1:
            return ""  # the empty repo's initial commit: round 0 goes on top of it
        parent = commits[1] if len(commits) > 1 else None
        if base is None and len(commits) > 2:
            return "it is not a commit on the repo's initial commit, where round 0 belongs"
        if base is not None and parent != base:
            return f"its parent is {parent}, not the latest round's commit {base}"
        names = [p.name for p in sorted(folder.iterdir())]
        infos = {i.path: i for i in self._call("read the files of", self.repo_id, self.api.get_paths_info, self.repo_id,
                                               names, revision=head)}
        for name in names:
            data, info = (folder / name).read_bytes(), infos.get(name)
            if info is None or getattr(info, "size", None) != len(data) or not _same_blob(info, data):
                return f"its {name} differs from this round's"
        return None

    def _stray_files(self, head: str, folder: Path) -> list[str]:
        """Files at `head` that a round does not hold (kept: the repo's .gitattributes)."""
        files = self._call("list the files of", self.repo_id, self.api.list_repo_files, self.repo_id, revision=head)
        ours = {p.name for p in folder.iterdir()} | {".gitattributes"}
        return sorted(f for f in files if f not in ours)

    def _report(self, key: str, message: str) -> None:
        if (key, message) not in self._reported:
            self._reported.add((key, message))
            logger.warning("%s", message)

    def _rounds(self, missing_ok: bool = True) -> dict[int, str]:
        """The federation's rounds -> their commits: the tags round-0000, round-0001, ... up to the first that
        is missing or fails `_not_next_round` ({} while the repo does not exist). Others are reported, ignored."""
        try:
            refs = self._call("list the round tags of", self.repo_id, self.api.list_repo_refs, self.repo_id)
        except HubRepoNotFoundError:
            if not missing_ok:
                raise
            if not self._said_missing:
                logger.info("%s not found on %s (yet): waiting for the aggregator to create it", self.repo_id, self.endpoint)
                self._said_missing = True
            return {}
        tagged = {int(m[1]): t.target_commit for t in refs.tags if (m := _TAG.fullmatch(t.name))}
        chain: dict[int, str] = {}
        while (commit := tagged.get(len(chain))) is not None:
            r = len(chain)
            if self._tags.get(r) != commit and (why := self._not_next_round(r, commit, chain.get(r - 1))):
                self._report(commit, f"tag {round_name(r)} of {self.repo_id!r} ({commit}) is not a round of this "
                             f"federation ({why}): ignored, with every later tag; the aggregator replaces it when it "
                             "publishes that round")
                break
            chain[r] = commit
        for r in sorted(set(tagged) - set(chain)):
            self._report(tagged[r], f"tag {round_name(r)} of {self.repo_id!r} is not on the federation's chain of rounds "
                         f"(its latest round is {len(chain) - 1}): ignored")
        self._tags = chain
        return dict(chain)

    def _not_next_round(self, round: int, commit: str, previous: Optional[str]) -> Optional[str]:
        """Why tag `round` at `commit` is not the federation's next round after `previous`, or None."""
        try:
            meta = read_metadata(self._download(self.repo_id, FEDERATION, commit).parent)
        except StoreUnavailableError:
            raise
        except Exception as err:  # whatever sits at a tag that is not ours
            return f"its federation.json cannot be read: {str(err)[:200]}"
        if meta["round"] != round:
            return f"its federation.json says round {meta['round']}"
        if previous is not None:
            history = self._call("read the history of", self.repo_id, self.api.list_repo_commits, self.repo_id, revision=commit)
            if previous not in {c.commit_id for c in history}:
                return f"its commit does not descend from round {round - 1}'s {previous}"
        return None

    def _commit(self, round: int) -> str:
        if round not in self._tags and round not in self._rounds(missing_ok=False):
            raise RoundNotPublishedError(
                f"Round {round} is not published in {self.repo_id!r} on {self.endpoint} (latest: "
                f"{max(self._tags, default=None)}): wait for the aggregator to publish it, or check the repo id.")
        return self._tags[round]

    def _metadata(self, round: int) -> dict[str, Any]:
        return read_metadata(self._download(self.repo_id, FEDERATION, self._commit(round)).parent)

    def _tag(self, round: int, commit: str, replace: bool = True) -> None:
        """Tag `commit` as `round`. A tag of that name off the federation's chain (forged, or left by another
        run) is replaced; one on the chain at another commit means another aggregator published the round."""
        if self._tags.get(round) == commit:
            return
        try:
            self._call(f"tag round {round} in", self.repo_id, self.api.create_tag, self.repo_id,
                       tag=round_name(round), revision=commit, tag_message=f"Round {round}")
        except HfHubHTTPError as err:  # 409: it exists (another aggregator repaired the same tag); fine if it agrees
            if _status(err)[1] == 409 and replace and round not in self._rounds() and round - 1 in self._tags | {-1: ""}:
                logger.warning("tag %s of %s is not a round of this federation: replacing it with round %d's commit %s",
                               round_name(round), self.repo_id, round, commit)
                self._call(f"delete the stray tag {round_name(round)} of", self.repo_id, self.api.delete_tag,
                           self.repo_id, tag=round_name(round))
                return self._tag(round, commit, replace=False)
            if _status(err)[1] == 409 and round in self._rounds() and self._tags[round] != commit:
                raise RoundAlreadyPublishedError(f"Round {round} of {self.repo_id!r} was published by another aggregator "
                                                 f"({self._tags[round]}) while this one committed {commit}.") from err
            if _status(err)[1] != 409 or self._rounds().get(round) != commit:
                raise HubStoreError(f"Tag {round_name(round)} of {self.repo_id!r} does not point to main's round {round} "
                                    f"commit {commit} ({err}); fix or delete the tag by hand.") from err
        self._tags[round] = commit

    # ---- client updates -------------------------------------------------------------------------
    def submit_update(self, round: int, client_id: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
        repo = self.update_repo(client_id)
        base = meta.get("base_round", round)
        data, record = update_record(round, client_id, tensors, {**meta, "base_commit": self._tags.get(base)
                                                                  or self._rounds().get(base)})
        if repo not in self._created:
            self._call("create", repo, self.api.create_repo, repo, private=self.private, exist_ok=True)
            self._created.add(repo)
        folder = round_name(round)
        ops = [CommitOperationAdd(f"{folder}/update.safetensors", data),
               CommitOperationAdd(f"{folder}/update.json", json.dumps(record, indent=2).encode())]
        self._call(f"upload client {client_id!r}'s round {round} update to", repo, self.api.create_commit, repo, ops,
                   commit_message=f"{client_id}: update for round {round}")
        return record["sha256"]

    def list_updates(self, round: int) -> list[str]:
        path = f"{round_name(round)}/update.json"
        return [c for c in self.clients
                if self._call(f"look for {path} in", self.update_repo(c), self.api.file_exists, self.update_repo(c), path)]

    def update_file(self, round: int, client_id: str, max_bytes: Optional[int] = None,
                    max_meta_bytes: Optional[int] = None) -> tuple[Path, dict[str, Any]]:
        repo, folder = self.update_repo(client_id), round_name(round)
        head = self._call("read", repo, self.api.repo_info, repo).sha  # both files from one upload, even mid-resubmission
        weights, record = f"{folder}/update.safetensors", f"{folder}/update.json"
        # sizes and last commits as the Hub records them, before downloading anything
        infos = {i.path: i for i in self._call(f"read the sizes of {folder}/ in", repo, self.api.get_paths_info, repo,
                                               [weights, record], expand=True, revision=head)}
        for name in (weights, record):
            if getattr(infos.get(name), "size", None) is None:
                raise ValueError(f"Update of {client_id!r} for round {round} has no {name} in {repo!r}; the client must resubmit.")
        check_update_size(infos[weights].size, max_bytes, round, client_id)
        if max_meta_bytes is not None and infos[record].size > max_meta_bytes:
            raise too_large(infos[record].size, max_meta_bytes, round, client_id)
        meta = parse_update_json(self._download(repo, record, head).read_bytes(), round, client_id, max_meta_bytes)
        path = self._download(repo, weights, head)
        check_update_file(path, meta, round, client_id)
        if meta.get("base_round") == round and meta.get("base_commit") != self._commit(round):
            raise ValueError(f"Update of {client_id!r} for round {round} was trained from commit {str(meta.get('base_commit'))[:64]} "
                             f"of {self.repo_id!r}, not from round {round}'s {self._commit(round)}: it belongs to "
                             "another run of the federation. The client must train from this run's round and resubmit.")
        last = getattr(infos[weights], "last_commit", None)
        if last is not None and getattr(last, "date", None) is not None:
            self._committed[(round, client_id)] = last.date.timestamp()
        else:
            self._committed.pop((round, client_id), None)
        return path, meta

    def committed_at(self, round: int, client_id: str) -> Optional[float]:
        """The date of the commit that last changed the client's update file (from `update_file`'s paths-info)."""
        return self._committed.get((round, client_id))

    # ---- requests -------------------------------------------------------------------------------
    def _download(self, repo_id: str, filename: str, revision: str) -> Path:
        return Path(self._call(f"download {filename} (at {revision[:12]}) from", repo_id, hf_hub_download, repo_id,
                               filename, revision=revision, endpoint=self.endpoint, token=self.api.token,
                               cache_dir=self.cache_dir))

    def _call(self, action: str, repo_id: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)`, retrying transient failures with exponential backoff for up to
        `retry_timeout` seconds; other failures become a `HubStoreError` that says what to do."""
        deadline, delay = time.monotonic() + self.retry_timeout, 0.25
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as err:
                if not _transient(err):
                    explained = self._explain(err, action, repo_id)
                    if explained is err:
                        raise
                    raise explained from err
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HubUnavailableError(
                        f"Could not {action} {repo_id!r}: {self.endpoint} kept failing for {self.retry_timeout:.0f}s "
                        f"(last error: {str(err).strip().splitlines()[0]}). Check the network or the Hub's status, then "
                        "rerun: the federation resumes from what the Hub holds.") from err
                logger.warning("%s %s failed transiently (%s); retrying in %.1fs", action, repo_id, type(err).__name__, delay)
                time.sleep(min(delay, left))
                delay = min(2 * delay, 10.0)

    def _explain(self, err: Exception, action: str, repo_id: str) -> Exception:
        http, status = _status(err)
        server = (getattr(http, "server_message", None) or "").strip()
        if status == 412:
            return _StaleParentError(f"Could not {action} {repo_id!r}: main moved since it was read (HTTP 412).")
        if isinstance(http, RepositoryNotFoundError):
            return HubRepoNotFoundError(
                f"Could not {action} {repo_id!r}: no such repo on {self.endpoint}, or {self._token_text()} may not "
                "read it (private repos look missing to others). Check the repo id and the token.")
        if status == 401:
            return HubPermissionError(
                f"Could not {action} {repo_id!r}: {self.endpoint} rejected {self._token_text()} (HTTP 401: {server}). "
                "Pass a valid token (token=..., --token or HF_TOKEN).")
        if status == 403:
            return HubPermissionError(
                f"Could not {action} {repo_id!r}: {self._token_text()} (user {self._user()!r}) has no write access to "
                f"it (HTTP 403: {server}). The global repo is written by the aggregator only; a client writes to its "
                "own updates repo. Use a token with write access to that repo.")
        return err

    def _token_text(self) -> str:
        token = self.api.token or get_token()
        if not token:
            return "no token (anonymous access)"
        shown = f"{token[:4]}...{token[-4:]}" if len(token) >= 16 else "***"
        return f"the token {shown}" + ("" if self.api.token else " (from HF_TOKEN or the saved login)")

    def _user(self) -> str:
        try:
            return self.api.whoami()["name"]
        except Exception:  # only to name the user in an error message
            return "unknown"


def _check_repo_id(repo_id: Any, what: str) -> str:
    """A Hub repo id 'namespace/name', or a ValueError saying what is wrong with it."""
    try:
        if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
            raise HFValidationError("it must be 'namespace/name'")
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"{what} must be a Hub repo id 'namespace/name' (e.g. 'my-org/my-federation'), got "
                         f"{str(repo_id)[:100]!r}: {str(err).splitlines()[0]}") from None
    return repo_id


def _same_blob(info: Any, data: bytes) -> bool:
    """Whether the Hub's record of a file (an LFS sha256, else the git blob id) is that of `data`."""
    lfs = getattr(info, "lfs", None)
    if lfs is not None:
        return lfs.sha256 == hashlib.sha256(data).hexdigest()
    return getattr(info, "blob_id", None) == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

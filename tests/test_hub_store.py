"""`HubStore` against the project's Hub-compatible server on loopback, through the real huggingface_hub client.

The store contract (publish once, in order; refuse bad client ids; verified updates; aggregation
that refuses tampered, stale and unregistered updates) runs on both the local folder store and the
Hub store. The rest is the Hub's own: one commit and one tag per round, both upload paths, two
aggregators racing, permissions, bad tokens, missing repos and transient server errors.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from helpers import MODULES, TinyNet, isolate_hub_client, make_config, make_model
from huggingface_hub import CommitOperationAdd, HfApi, constants, hf_hub_download, snapshot_download
from peft import PeftModel

from peft_federated import get_strategy
from peft_federated.adapter import effective_weight
from peft_federated.aggregator import aggregate_round, initialize
from peft_federated.hub_integration import LocalStore, RoundAlreadyPublishedError
from peft_federated.hub_integration.hub_store import (
    HubPermissionError, HubRepoNotFoundError, HubStore, HubUnavailableError, RoundNotPublishedError,
)
from peft_federated.testing import HubServer

REPO = "org/federation"
TOKENS = {"tok-aggregator": "aggregator", "tok-rival": "rival", "tok-alice": "alice", "tok-bob": "bob",
          "tok-carol": "carol", "tok-mallory": "mallory"}
# alice and mallory write to repos in their own namespace; bob and carol to the default "<repo>-updates-<id>"
PERMISSIONS = {"aggregator": ["org/*"], "rival": [REPO], "bob": [f"{REPO}-updates-bob"], "carol": [f"{REPO}-updates-carol"]}
CLIENT_REPOS = {"alice": "alice/fed-updates", "mallory": "mallory/fed-updates"}
CLIENTS = ["alice", "bob", "carol", "mallory"]


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    isolate_hub_client(monkeypatch, tmp_path)


@pytest.fixture
def make_server(tmp_path):
    servers: list[HubServer] = []

    def make(**kwargs) -> HubServer:
        servers.append(HubServer(tmp_path / "hub", TOKENS, PERMISSIONS, **kwargs).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> HubServer:
    return make_server()


def hub_store(server: HubServer, token: str = "tok-aggregator", repo: str = REPO, **kw) -> HubStore:
    kw.setdefault("retry_timeout", 5.0)
    return HubStore(repo, CLIENTS, CLIENT_REPOS, token=token, endpoint=server.url, **kw)


def client_store(server: HubServer, client: str) -> HubStore:
    return HubStore(REPO, [client], {c: r for c, r in CLIENT_REPOS.items() if c == client}, token=f"tok-{client}",
                    endpoint=server.url, retry_timeout=5.0)


def random_payload(cfg, state, model, client, seed):
    g = torch.Generator().manual_seed(seed)
    cr = get_strategy(cfg).prepare_client(model, state, client)
    return {k: torch.randn(v.shape, generator=g) for k, v in cr.payload().items()}


def assert_states_equal(a, b) -> None:
    assert a.round == b.round and a.tensors.keys() == b.tensors.keys() and a.strategy_state == b.strategy_state
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    assert a.base_delta.keys() == b.base_delta.keys()
    for module in a.base_delta:
        assert torch.equal(a.base_delta[module].dense(), b.base_delta[module].dense()), module


# ---- the store contract, on both stores --------------------------------------------------------------
class Federation:
    """The aggregator's store, each client's own store, and a way to tamper with a stored update."""

    def __init__(self, kind: str, tmp_path: Path, server: HubServer | None) -> None:
        self.kind, self.server, self.tmp_path = kind, server, tmp_path
        self.cfg = make_config("fedit", r=2)
        self.model = make_model(self.cfg)
        self.store = LocalStore(tmp_path / "store") if kind == "local" else hub_store(server)
        initialize(self.store, self.cfg, self.model)

    def client(self, client_id: str):
        return self.store if self.kind == "local" else client_store(self.server, client_id)

    def tamper(self, round: int, client_id: str) -> None:
        """Corrupt the stored update.safetensors, leaving update.json (and its sha256) as the client wrote it."""
        path = f"round-{round:04d}/update.safetensors"
        if self.kind == "local":
            file = self.store.root / "updates" / client_id / path
            file.write_bytes(file.read_bytes()[:-8] + b"\x00" * 8)
            return
        repo = self.store.update_repo(client_id)
        data = Path(hf_hub_download(repo, path, endpoint=self.server.url, cache_dir=self.tmp_path / "tamper")).read_bytes()
        HfApi(endpoint=self.server.url, token=f"tok-{client_id}").create_commit(
            repo, [CommitOperationAdd(path, data[:-8] + b"\x00" * 8)], commit_message="tamper")


@pytest.fixture(params=["local", "hub"])
def fed(request, tmp_path, make_server) -> Federation:
    return Federation(request.param, tmp_path, make_server() if request.param == "hub" else None)


def test_round_trip_of_published_rounds_and_history(fed, tmp_path):
    store, cfg = fed.store, fed.cfg
    state0 = get_strategy(cfg).initial_state(fed.model)
    assert store.latest_round() == 0
    assert store.federation == (str(store.root.resolve()) if isinstance(store, LocalStore) else REPO)  # the repo id, not the endpoint
    assert_states_equal(store.read_round(0)[0], state0)
    new = get_strategy(cfg).aggregate(state0, [("alice", random_payload(cfg, state0, fed.model, "alice", 1), 3)])
    store.publish_round(new, cfg, {"contributions": [], "metrics": {"loss": 0.5}})
    assert store.latest_round() == 1
    assert_states_equal(store.read_round()[0], new)
    assert_states_equal(store.read_round(1)[0], new)
    assert [(h["round"], h["strategy"], h.get("metrics")) for h in store.history()] == [(0, "fedit", {}), (1, "fedit", {"loss": 0.5})]
    # a published round is a plain PEFT adapter folder with a model card (test_hub_federation.py loads
    # one with PeftModel.from_pretrained(base, repo_id, revision=...) in a process with HF_ENDPOINT set)
    folder = store.round_path(1) if fed.kind == "local" else Path(snapshot_download(
        REPO, revision="round-0001", endpoint=fed.server.url, cache_dir=tmp_path / "snapshot"))
    torch.manual_seed(0)  # the same base as make_model's
    loaded = PeftModel.from_pretrained(TinyNet(), folder)
    reference = make_model(cfg)
    get_strategy(cfg).prepare_client(reference, new, "global").close()
    for m in MODULES:
        torch.testing.assert_close(effective_weight(loaded, m), effective_weight(reference, m))
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft") and "| 1 |" in card


def test_a_round_is_published_once_and_in_order(fed):
    cfg, store = fed.cfg, fed.store
    state, _ = store.read_round(0)
    with pytest.raises(RoundAlreadyPublishedError):
        store.publish_round(state, cfg, {})
    state.round = 5
    with pytest.raises(ValueError, match="the next round in .* is 1"):
        store.publish_round(state, cfg, {})
    assert store.latest_round() == 0 and [h["round"] for h in store.history()] == [0]
    if isinstance(store, LocalStore):  # no half-written round left behind
        assert not list(store.root.glob(".publish-*"))


def test_client_ids_with_path_characters_are_refused(fed):
    requests_before = len(fed.server.requests) if fed.server else 0
    for bad in ["../evil", "a/b", "a\\b", "", ".hidden", "x" * 97, "a..b", None]:
        with pytest.raises(ValueError, match="Invalid client id"):
            fed.client("alice").submit_update(0, bad, {"x": torch.zeros(1)}, {"num_samples": 1, "base_round": 0})
        if fed.kind == "hub":
            with pytest.raises(ValueError, match="Invalid client id"):
                HubStore(REPO, [bad], endpoint=fed.server.url)
    if fed.kind == "local":
        assert list((fed.store.root / "updates").iterdir()) == []
    else:  # refused before any request
        assert len(fed.server.requests) == requests_before


def test_aggregation_refuses_tampered_stale_and_unregistered_updates_and_keeps_the_rest(fed):
    cfg, store, model = fed.cfg, fed.store, fed.model
    state, _ = store.read_round()
    good = random_payload(cfg, state, model, "alice", 1)
    fed.client("alice").submit_update(0, "alice", good, {"num_samples": 4, "base_round": 0})
    fed.client("bob").submit_update(0, "bob", random_payload(cfg, state, model, "bob", 2), {"num_samples": 4, "base_round": 0})
    fed.client("carol").submit_update(0, "carol", random_payload(cfg, state, model, "carol", 3), {"num_samples": 4, "base_round": 7})
    fed.client("mallory").submit_update(0, "mallory", random_payload(cfg, state, model, "mallory", 4), {"num_samples": 4, "base_round": 0})
    assert store.list_updates(0) == ["alice", "bob", "carol", "mallory"] and store.list_updates(1) == []
    fed.tamper(0, "bob")
    with pytest.raises(ValueError, match="sha256"):
        store.read_update(0, "bob")
    assert aggregate_round(store, cfg, clients=["alice", "bob", "carol"]) == 1
    meta = store.history()[1]
    assert [c["client_id"] for c in meta["contributions"]] == ["alice"]
    reasons = {r["client_id"]: r["reason"] for r in meta["refused"]}
    assert "sha256" in reasons["bob"] and "trained from round 7" in reasons["carol"]
    assert "not a registered client" in reasons["mallory"]
    published, _ = store.read_round(1)
    for key, value in good.items():
        torch.testing.assert_close(published.tensors[key], value)


def test_a_resubmission_replaces_the_earlier_update(fed):
    cfg, store = fed.cfg, fed.store
    state, _ = store.read_round()
    first, second = (random_payload(cfg, state, fed.model, "alice", s) for s in (1, 2))
    alice = fed.client("alice")
    alice.submit_update(0, "alice", first, {"num_samples": 4, "base_round": 0})
    digest = alice.submit_update(0, "alice", second, {"num_samples": 5, "base_round": 0, "metrics": {"loss": 1.0}})
    tensors, meta = store.read_update(0, "alice")
    assert meta["sha256"] == digest and meta["num_samples"] == 5 and meta["client_id"] == "alice" and meta["round"] == 0
    for key, value in second.items():
        assert torch.equal(tensors[key], value)


# ---- the Hub's own behaviour -----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["regular", "lfs"])
def test_each_round_is_one_commit_and_one_tag_on_either_upload_path(make_server, monkeypatch, tmp_path, mode):
    if mode == "lfs":  # the server asks for LFS; the client must use plain git-LFS (no xet)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    server = make_server(lfs_mode=mode)
    cfg = make_config("fedex", r=2)
    model = make_model(cfg)
    store = hub_store(server)
    initialize(store, cfg, model)
    for rnd in range(2):
        state, _ = store.read_round(rnd)
        for k, client in enumerate(["alice", "bob"]):
            payload = random_payload(cfg, state, model, client, 10 * rnd + k)
            client_store(server, client).submit_update(rnd, client, payload, {"num_samples": 3 + k, "base_round": rnd})
        assert aggregate_round(store, cfg, clients=["alice", "bob"]) == rnd + 1

    api = HfApi(endpoint=server.url)
    refs = api.list_repo_refs(REPO)
    tags = {t.name: t.target_commit for t in refs.tags}
    assert sorted(tags) == ["round-0000", "round-0001", "round-0002"]
    assert {b.name: b.target_commit for b in refs.branches} == {"main": tags["round-0002"]}
    commits = api.list_repo_commits(REPO)
    assert [c.title for c in commits] == ["Round 2", "Round 1", "Round 0", "initial commit"]
    assert [c.commit_id for c in commits[:3]] == [tags["round-0002"], tags["round-0001"], tags["round-0000"]]
    files = {f.path: f for f in api.list_repo_tree(REPO, revision="round-0001")}
    assert {"adapter_model.safetensors", "adapter_config.json", "federation.json", "README.md"} <= set(files)
    config = json.loads(Path(hf_hub_download(REPO, "adapter_config.json", revision="round-0002", endpoint=server.url)).read_text())
    assert config["peft_type"] == "LORA" and "strategy" not in config and config["rank_pattern"]  # fedex: base change
    lfs_batches = [r for r in server.requests if r[1].endswith(".git/info/lfs/objects/batch")]
    if mode == "lfs":
        assert files["adapter_model.safetensors"].lfs is not None and lfs_batches
    else:
        assert files["adapter_model.safetensors"].lfs is None and not lfs_batches
    # updates carry the global commit they were trained from
    update = json.loads(Path(hf_hub_download(f"{REPO}-updates-bob", "round-0001/update.json", endpoint=server.url)).read_text())
    assert update["base_commit"] == tags["round-0001"] and update["base_round"] == 1
    # a fresh reader (its own cache) reads every round back from the Hub alone
    reader = HubStore(REPO, endpoint=server.url, cache_dir=tmp_path / "reader-cache")
    for rnd in range(3):
        assert_states_equal(reader.read_round(rnd)[0], store.read_round(rnd)[0])
    assert [h["round"] for h in reader.history()] == [0, 1, 2]


def test_two_aggregators_publish_a_round_once(server):
    cfg = make_config("fedit", r=2)
    model = make_model(cfg)
    first, second = hub_store(server), hub_store(server, token="tok-rival")
    initialize(first, cfg, model)
    state, _ = first.read_round(0)
    new = get_strategy(cfg).aggregate(state, [("alice", random_payload(cfg, state, model, "alice", 1), 3)])
    other = get_strategy(cfg).aggregate(state, [("bob", random_payload(cfg, state, model, "bob", 2), 3)])

    # The second aggregator reads main, then the first publishes before the second commits: a real race.
    read_head = second._head

    def head_then_lose_the_race():
        head = read_head()
        if not first_published:
            first_published.append(first.publish_round(new, cfg, {}))
        return head

    first_published: list[str] = []
    second._head = head_then_lose_the_race
    with pytest.raises(RoundAlreadyPublishedError, match="Round 1 is already published"):
        second.publish_round(other, cfg, {})
    commit_replies = [status for method, path, status in server.requests if "/commit/main" in path]
    assert commit_replies == [200, 200, 412]  # round 0, the first aggregator's round 1, the stale one
    assert first.latest_round() == 1 and second.latest_round() == 1
    assert_states_equal(second.read_round(1)[0], new)
    assert HfApi(endpoint=server.url).repo_info(REPO).sha == first_published[0]
    # aggregate_round treats the lost race as done: the round is there
    with pytest.raises(RoundAlreadyPublishedError):
        first.publish_round(other, cfg, {})


def test_a_publisher_that_died_between_commit_and_tag_is_repaired(server):
    cfg = make_config("fedit", r=2)
    model = make_model(cfg)
    store = hub_store(server)
    initialize(store, cfg, model)
    state, _ = store.read_round(0)
    new = get_strategy(cfg).aggregate(state, [("alice", random_payload(cfg, state, model, "alice", 1), 3)])
    commit = store.publish_round(new, cfg, {})
    HfApi(endpoint=server.url, token="tok-aggregator").delete_tag(REPO, tag="round-0001")  # as if it died before tagging
    restarted = hub_store(server)
    assert restarted.latest_round() == 0
    with pytest.raises(RoundAlreadyPublishedError):
        restarted.publish_round(new, cfg, {})
    assert {t.name: t.target_commit for t in HfApi(endpoint=server.url).list_repo_refs(REPO).tags}["round-0001"] == commit
    assert restarted.latest_round() == 1


def test_a_client_cannot_write_the_global_repo(server):
    cfg = make_config("fedit", r=2)
    aggregator = hub_store(server)
    initialize(aggregator, cfg, make_model(cfg))
    head = HfApi(endpoint=server.url).repo_info(REPO).sha
    alice = client_store(server, "alice")
    state, _ = alice.read_round(0)  # clients may read it
    state.round = 1
    with pytest.raises(HubPermissionError) as exc:
        alice.publish_round(state, cfg, {})
    message = str(exc.value)
    assert "403" in message and "'alice'" in message and repr(REPO) in message and "updates repo" in message
    with pytest.raises(HubPermissionError, match="'alice'"):  # nor another client's updates repo
        HubStore(REPO, ["bob"], token="tok-alice", endpoint=server.url).submit_update(0, "bob", {"x": torch.zeros(1)}, {"base_round": 0})
    assert HfApi(endpoint=server.url).repo_info(REPO).sha == head and aggregator.latest_round() == 0


def test_a_bad_token_gets_a_clear_error(server):
    cfg = make_config("fedit", r=2)
    initialize(hub_store(server), cfg, make_model(cfg))
    store = hub_store(server, token="hf_not-a-valid-token-at-all")
    with pytest.raises(HubPermissionError, match=r"rejected the token hf_n\.\.\.-all \(HTTP 401") as exc:
        store.latest_round()
    assert repr(REPO) in str(exc.value) and "HF_TOKEN" in str(exc.value)
    with pytest.raises(HubPermissionError, match="401"):
        store.submit_update(0, "bob", {"x": torch.zeros(1)}, {"base_round": 0})


def test_missing_repos_and_rounds_get_precise_errors(server):
    missing = hub_store(server, repo="org/no-such-federation")
    assert missing.latest_round() is None and missing.history() == []  # the aggregator has not created it yet
    with pytest.raises(HubRepoNotFoundError, match="'org/no-such-federation'.*no such repo"):
        missing.read_round(0)
    cfg = make_config("fedit", r=2)
    store = hub_store(server)
    initialize(store, cfg, make_model(cfg))
    with pytest.raises(RoundNotPublishedError, match=r"Round 3 is not published in 'org/federation'.*latest: 0"):
        store.read_round(3)
    with pytest.raises(HubRepoNotFoundError, match="'org/federation-updates-carol'"):
        store.read_update(0, "carol")  # carol never submitted: her updates repo does not exist
    assert store.list_updates(0) == []


def test_transient_errors_are_retried_then_reported(server):
    cfg = make_config("fedit", r=2)
    store = hub_store(server)
    initialize(store, cfg, make_model(cfg))
    server.fail_next(2, status=503, path_contains="/refs")
    assert store.latest_round() == 0  # the third try got through
    assert [s for _, p, s in server.requests if p.endswith("/refs")].count(503) == 2

    state, _ = store.read_round(0)
    update = random_payload(cfg, state, make_model(cfg), "bob", 1)
    server.fail_next(1, status=500, path_contains="/commit/main")
    client_store(server, "bob").submit_update(0, "bob", update, {"num_samples": 2, "base_round": 0})
    assert store.list_updates(0) == ["bob"]
    assert [s for _, p, s in server.requests if p.startswith(f"/api/models/{REPO}-updates-bob/commit/")][:2] == [500, 200]

    impatient = hub_store(server, retry_timeout=1.0)
    server.fail_next(1000, status=502, path_contains="/refs")
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="kept failing for 1s.*502"):
        impatient.latest_round()
    assert time.monotonic() - start < 4


def test_an_unreachable_hub_is_retried_then_reported():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    store = HubStore(REPO, endpoint=url, retry_timeout=0.6)
    start = time.monotonic()
    with pytest.raises(HubUnavailableError, match="kept failing") as exc:
        store.latest_round()
    assert time.monotonic() - start < 4 and isinstance(exc.value, ConnectionError)

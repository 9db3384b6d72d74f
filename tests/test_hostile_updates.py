"""Faults and hostile clients at the store level, on the local folder store and through the real Hub
server: each bad update is refused with a precise reason recorded in the round's metadata, nothing
from it is published, and the other clients' updates are. Also: the size and norm-outlier limits,
duplicates, and a Hub restarted in the middle of a round (or one that stays down).

A hostile client writes raw files into its own update folder / its own updates repo, bypassing
`submit_update`, exactly as a malicious party could.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save as save_bytes
# the store-contract fixtures (fed: the local folder store and the Hub store), shared with test_hub_store.py
from test_hub_store import PERMISSIONS, REPO, TOKENS, Federation, fed, hf_env, make_server, random_payload  # noqa: F401

from peft_federated import get_strategy
from peft_federated.aggregator import aggregate_round
from peft_federated.hub_integration.hub_store import HubUnavailableError
from peft_federated.testing import HubServer

CLIENTS = ["alice", "bob", "carol", "mallory"]


def upload_raw(fed: Federation, client: str, weights: bytes, record: dict | bytes, round: int = 0) -> None:
    """Write update.safetensors and update.json exactly as given into `client`'s own update place."""
    meta = record if isinstance(record, bytes) else json.dumps(record).encode()
    folder = f"round-{round:04d}"
    if fed.kind == "local":
        target = fed.store.root / "updates" / client / folder
        target.mkdir(parents=True, exist_ok=True)
        (target / "update.safetensors").write_bytes(weights)
        (target / "update.json").write_bytes(meta)
        return
    repo = fed.store.update_repo(client)
    api = HfApi(endpoint=fed.server.url, token=f"tok-{client}")
    api.create_repo(repo, exist_ok=True)
    api.create_commit(repo, [CommitOperationAdd(f"{folder}/update.safetensors", weights),
                             CommitOperationAdd(f"{folder}/update.json", meta)], commit_message="raw upload")


def record_for(fed: Federation, client: str, weights: bytes, **changes) -> dict:
    """The update.json an honest client would write for these bytes, with `changes`."""
    record = {"round": 0, "client_id": client, "base_round": 0, "num_samples": 4, "sha256": hashlib.sha256(weights).hexdigest()}
    if fed.kind == "hub":
        record["base_commit"] = fed.store._commit(0)
    return {**record, **changes}


def honest(fed: Federation, client: str, seed: int, scale: float = 1.0) -> dict:
    state, _ = fed.store.read_round(0)
    payload = {k: v * scale for k, v in random_payload(fed.cfg, state, fed.model, client, seed).items()}
    fed.client(client).submit_update(0, client, payload, {"num_samples": 4, "base_round": 0})
    return payload


def assert_published(fed: Federation, accepted: dict[str, dict], refused: dict[str, str]) -> dict:
    """Round 1 is published from exactly `accepted` (client -> payload); each refused reason matches."""
    assert aggregate_round(fed.store, fed.cfg, clients=CLIENTS) == 1
    meta = fed.store.history()[1]
    assert [c["client_id"] for c in meta["contributions"]] == sorted(accepted)
    reasons = {r["client_id"]: r["reason"] for r in meta["refused"]}
    assert reasons.keys() == refused.keys(), reasons
    for client, pattern in refused.items():
        assert pattern in reasons[client], reasons[client]
    published, _ = fed.store.read_round(1)
    state0, _ = fed.store.read_round(0)
    expected = get_strategy(fed.cfg).aggregate(state0, [(c, p, 4) for c, p in sorted(accepted.items())])
    for key, value in expected.tensors.items():
        torch.testing.assert_close(published.tensors[key], value)
    return meta


# name -> (mallory's bytes from an honest payload, changes to her update.json or its raw bytes, the reason's words)
HOSTILE = {
    "truncated": (lambda p: save_bytes(p)[:-40], {}, "not a readable safetensors file"),
    "garbage": (lambda p: b"\x08\x00\x00\x00\x00\x00\x00\x00{not json", {}, "not a readable safetensors file"),
    "unknown tensor": (lambda p: save_bytes({**p, "base_model.model.evil.weight": torch.zeros(2)}), {}, "unexpected tensors"),
    "missing tensor": (lambda p: save_bytes(dict(list(p.items())[1:])), {}, "missing tensors"),
    "wrong shape": (lambda p: save_bytes({k: v[..., :-1].contiguous() if k.endswith("head.weight") else v for k, v in p.items()}),
                    {}, "expected"),
    "rank above allowed": (lambda p: save_bytes({k: torch.cat([v, v[:1]]) if "lora_A" in k else
                                                 (torch.cat([v, v[:, :1]], 1) if "lora_B" in k else v) for k, v in p.items()}),
                           {}, "its rank must be in [2, 2]"),
    "wrong dtype": (lambda p: save_bytes({k: v.double() for k, v in p.items()}), {}, "dtype torch.float64"),
    "NaN": (lambda p: save_bytes({k: v.clone().fill_(float("nan")) for k, v in p.items()}), {}, "NaN or Inf"),
    "Inf": (lambda p: save_bytes({k: v.clone().fill_(float("inf")) for k, v in p.items()}), {}, "NaN or Inf"),
    "sha256 mismatch": (save_bytes, {"sha256": "0" * 64}, "does not match its recorded sha256"),
    "another client's name": (save_bytes, {"client_id": "alice"}, "is for client 'alice'"),
    "older round": (save_bytes, {"base_round": -1}, "trained from round -1"),
    "bad num_samples": (save_bytes, {"num_samples": "many"}, "num_samples must be a positive integer"),
    "update.json not JSON": (save_bytes, b"{oops", "is not valid JSON"),
    "update.json not an object": (save_bytes, b"[1, 2]", "must be a JSON object"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_update_is_refused_with_its_reason_and_the_others_are_published(fed, kind):
    make_bytes, changes, reason = HOSTILE[kind]
    good = {"alice": honest(fed, "alice", 1), "bob": honest(fed, "bob", 2)}
    state, _ = fed.store.read_round(0)
    weights = make_bytes(random_payload(fed.cfg, state, fed.model, "mallory", 3))
    upload_raw(fed, "mallory", weights, changes if isinstance(changes, bytes) else record_for(fed, "mallory", weights, **changes))
    assert_published(fed, good, {"mallory": reason})


def test_an_update_from_another_run_of_the_federation_is_refused(make_server, tmp_path):
    fed = Federation("hub", tmp_path, make_server())
    good = {"alice": honest(fed, "alice", 1)}
    state, _ = fed.store.read_round(0)
    weights = save_bytes(random_payload(fed.cfg, state, fed.model, "mallory", 3))
    upload_raw(fed, "mallory", weights, record_for(fed, "mallory", weights, base_commit="f" * 40))
    assert_published(fed, good, {"mallory": "belongs to another run of the federation"})


def test_an_oversized_update_is_refused_unread(fed):
    good = {"alice": honest(fed, "alice", 1)}
    weights = save_bytes({"padding": torch.zeros(64 * 1024)})  # 256 KiB
    upload_raw(fed, "mallory", weights, record_for(fed, "mallory", weights))
    fed.cfg.max_update_bytes = 100_000
    requests_before = len(fed.server.requests) if fed.server else 0
    assert_published(fed, good, {"mallory": f"is {len(weights)} bytes, above max_update_bytes=100000: refused unread"})
    if fed.server:  # its size came from the Hub's metadata: the file itself was never downloaded
        downloads = [p for m, p, _ in fed.server.requests[requests_before:] if m == "GET" and "/resolve/" in p]
        assert downloads and not any("mallory" in p and p.endswith("update.safetensors") for p in downloads)


def test_a_norm_outlier_is_refused_when_three_or_more_updates_arrive(fed):
    fed.cfg.norm_outlier_factor = 5.0
    good = {c: honest(fed, c, seed) for seed, c in enumerate(["alice", "bob", "carol"], 1)}
    honest(fed, "mallory", 4, scale=100.0)
    meta = assert_published(fed, good, {"mallory": "above norm_outlier_factor=5 x the round's median norm"})
    assert all(c["norm"] > 0 and len(c["sha256"]) == 64 for c in meta["contributions"])


def test_the_outlier_rule_needs_three_updates(fed):
    fed.cfg.norm_outlier_factor = 5.0
    accepted = {"alice": honest(fed, "alice", 1), "mallory": honest(fed, "mallory", 4, scale=100.0)}
    assert_published(fed, accepted, {})


def test_the_same_update_counts_once(fed):
    alice = honest(fed, "alice", 1)
    honest(fed, "alice", 1)  # submitted twice: one update in the store
    fed.client("bob").submit_update(0, "bob", alice, {"num_samples": 4, "base_round": 0})  # bob copies alice's bytes
    assert fed.store.list_updates(0) == ["alice", "bob"]
    assert_published(fed, {"alice": alice}, {"bob": "byte for byte the update of 'alice': an update counts once"})


def test_a_hub_restarted_in_the_middle_of_a_round_only_delays_it(tmp_path, make_server):
    server = make_server()
    fed = Federation("hub", tmp_path, server)
    good = {c: honest(fed, c, seed) for seed, c in enumerate(["alice", "bob"], 1)}
    port = int(server.url.rsplit(":", 1)[1])
    server.stop()
    restarted: list[HubServer] = []
    timer = threading.Timer(1.5, lambda: restarted.append(HubServer(tmp_path / "hub", TOKENS, PERMISSIONS, port=port).start()))
    timer.start()
    fed.store.retry_timeout = 30.0
    try:
        started = time.monotonic()
        assert_published(fed, good, {})  # retried with backoff until the Hub came back
        assert time.monotonic() - started >= 1.4
    finally:
        timer.join()
        for s in restarted:
            s.stop()


def test_a_hub_that_stays_down_gives_a_clear_error_in_bounded_time(tmp_path, make_server):
    server = make_server()
    fed = Federation("hub", tmp_path, server)
    honest(fed, "alice", 1)
    server.stop()
    fed.store.retry_timeout = 1.0
    started = time.monotonic()
    with pytest.raises(HubUnavailableError, match="kept failing for 1s.*rerun: the federation resumes"):
        aggregate_round(fed.store, fed.cfg, clients=CLIENTS)
    assert time.monotonic() - started < 5


def test_a_client_cannot_overwrite_another_clients_update_or_the_global_repo(make_server, tmp_path):
    fed = Federation("hub", tmp_path, make_server())
    good = {"bob": honest(fed, "bob", 2)}
    head = HfApi(endpoint=fed.server.url).repo_info(REPO).sha
    mallory = HfApi(endpoint=fed.server.url, token="tok-mallory")
    for repo in (fed.store.update_repo("bob"), REPO):
        with pytest.raises(HfHubHTTPError) as exc:
            mallory.create_commit(repo, [CommitOperationAdd("round-0000/update.safetensors", b"evil")], commit_message="x")
        assert exc.value.response.status_code == 403
    assert HfApi(endpoint=fed.server.url).repo_info(REPO).sha == head
    assert_published(fed, good, {})  # bob's update, untouched

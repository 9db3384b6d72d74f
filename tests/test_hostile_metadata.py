"""A registered client's hostile update.json, sample counts and copies, on the local folder store and
through the loopback Hub: each is refused (or capped) with a precise reason, the other clients' updates
are published, and what is published stays strict JSON and plain markdown. The inputs that used to
crash `peft-federated aggregate` go through the real command (a process that could die).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import hf_hub_download
from safetensors.torch import save as save_bytes
from test_hostile_updates import CLIENTS, assert_published, honest, record_for, upload_raw
# the store-contract fixtures (fed: the local folder store and the Hub store)
from test_hub_store import Federation, fed, hf_env, make_server, random_payload  # noqa: F401

from peft_federated import get_strategy
from peft_federated.aggregator import _share_caps, aggregate_round
from peft_federated.config import FederatedLoraConfig
from peft_federated.hub_integration.hub_store import HubStore
from peft_federated.hub_integration.model_card import render_model_card
from peft_federated.hub_integration.store import LocalStore
from peft_federated.testing.processes import REPO, ProcessFederation


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def metric(value) -> dict:
    return {"metrics": {"train_loss": value}}


# name -> (changes to mallory's update.json, or its raw bytes (a function of an honest record), the reason's words)
HOSTILE_META = {
    "huge num_samples (int overflow)": ({"num_samples": 10**400}, "above max_num_samples=10000000"),
    "num_samples 10**300": ({"num_samples": 10**300}, "above max_num_samples=10000000"),
    "num_samples True": ({"num_samples": True}, "num_samples must be a positive integer"),
    "metric 10**400": (metric(10**400), "its magnitude must be at most"),
    "metric 1e400 (inf)": (lambda r: json.dumps(r).replace('"num_samples"', '"metrics": {"loss": 1e400}, "num_samples"').encode(),
                           "a metric is finite"),
    "metric NaN": (lambda r: json.dumps({**r, "metrics": {"loss": float("nan")}}).encode(), "NaN is not a number in strict JSON"),
    "metric Infinity": (lambda r: json.dumps({**r, "metrics": {"loss": float("inf")}}).encode(), "Infinity is not a number"),
    "metrics a string": ({"metrics": "loss=0.1"}, "metrics of type str"),
    "metric a string": (metric("0.1"), "a metric is a number"),
    "metric name with markdown": ({"metrics": {"loss |\n# Owned\n[click](http://evil)": 1.0}}, "has a metric named"),
    "too many metrics": ({"metrics": {f"m{i}": 1.0 for i in range(33)}}, "33 metrics, above the 32 allowed"),
    "unknown field": ({"note": "x" * 100}, "unknown fields ['note']"),
    "sha256 not hex": ({"sha256": "Z" * 64}, "does not match its recorded sha256"),
    "base_commit not a commit id": ({"base_commit": ["x"]}, "['x']"),  # the Hub store refuses it as another run's first
    "nested 200,000 deep": (lambda r: nested(200_000), "above max_update_json_bytes=65536: refused unread"),
    "nested 30,000 deep": (lambda r: nested(30_000), "nested too deeply to parse"),
    "5 MB of metrics": (lambda r: json.dumps({**r, "metrics": {"m": 1.0}, "pad": "x" * 5_000_000}).encode(),
                        "above max_update_json_bytes"),
    "integer too long to parse": (lambda r: json.dumps(r).replace('"num_samples": 4', '"num_samples": ' + "9" * 5000).encode(),
                                  "is not valid JSON"),
}


def round_file(fed: Federation, name: str, round: int = 1) -> str:
    """A published round's file as a reader sees it."""
    if fed.kind == "local":
        return (fed.store.round_folder(round) / name).read_text()
    return Path(hf_hub_download(REPO, name, revision=f"round-{round:04d}", endpoint=fed.server.url,
                                cache_dir=fed.tmp_path / "reader")).read_text()


def strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in federation.json")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("kind", sorted(HOSTILE_META))
def test_hostile_update_json_is_refused_and_what_is_published_stays_strict(fed, kind):
    changes, reason = HOSTILE_META[kind]
    good = {"alice": honest(fed, "alice", 1), "bob": honest(fed, "bob", 2)}
    state, _ = fed.store.read_round(0)
    weights = save_bytes(random_payload(fed.cfg, state, fed.model, "mallory", 3))  # valid weights: only the metadata is bad
    record = record_for(fed, "mallory", weights)
    upload_raw(fed, "mallory", weights, changes(record) if callable(changes) else record_for(fed, "mallory", weights, **changes))
    meta = assert_published(fed, good, {"mallory": reason})
    assert "the client must" in meta["refused"][0]["reason"] or "The client must" in meta["refused"][0]["reason"]
    strict(round_file(fed, "federation.json"))
    card = round_file(fed, "README.md")
    assert "Owned" not in card and "evil" not in card and "](http://evil" not in card


def test_update_json_above_its_limit_is_never_downloaded_from_the_hub(make_server, tmp_path):
    fed = Federation("hub", tmp_path, make_server())
    good = {"alice": honest(fed, "alice", 1)}
    state, _ = fed.store.read_round(0)
    weights = save_bytes(random_payload(fed.cfg, state, fed.model, "mallory", 3))
    upload_raw(fed, "mallory", weights, json.dumps({**record_for(fed, "mallory", weights), "pad": "x" * 200_000}).encode())
    fed.server.requests.clear()
    assert_published(fed, good, {"mallory": "above max_update_json_bytes"})
    fetched = [path for method, path, _ in fed.server.requests if method == "GET" and "mallory" in path and "/resolve/" in path]
    assert fetched == [], fetched  # neither her update.json nor her weights left the Hub


def test_metrics_are_averaged_finite_and_the_model_card_escapes_client_text(fed):
    state, _ = fed.store.read_round(0)
    for client, seed, loss in (("alice", 1, 0.25), ("bob", 2, 0.75)):
        payload = random_payload(fed.cfg, state, fed.model, client, seed)
        fed.client(client).submit_update(0, client, payload, {"num_samples": 4, "base_round": 0,
                                                              "metrics": {"train_loss": loss, "total_flos": 1e20}})
    assert aggregate_round(fed.store, fed.cfg, clients=CLIENTS) == 1
    meta = strict(round_file(fed, "federation.json"))
    assert meta["metrics"] == {"clients_mean_train_loss": 0.5, "clients_mean_total_flos": 1e20}
    # a history written by anyone (an older version, a forged round) still renders no client markdown
    history = [meta, {"round": 2, "contributions": [{"num_samples": "4 | # Owned"}, {"num_samples": 10**400}],
                      "metrics": {"x |\n# Owned [a](http://evil)": 1.0, "ok": float("nan"), "fine": 2.0}}]
    card = render_model_card(fed.cfg, history, repo_id=REPO)
    assert "Owned" not in card and "evil" not in card and "nan" not in card
    assert "| fine |" in card and "| 2 | 2 | 0 |" in card  # the bad counts are dropped, the safe metric kept


def test_a_client_above_max_num_samples_is_refused_and_honest_weights_are_kept(fed):
    fed.cfg = dataclasses.replace(fed.cfg, max_num_samples=1000)
    good = {"alice": honest(fed, "alice", 1), "bob": honest(fed, "bob", 2)}
    state, _ = fed.store.read_round(0)
    payload = random_payload(fed.cfg, state, fed.model, "mallory", 3)
    fed.client("mallory").submit_update(0, "mallory", payload, {"num_samples": 1001, "base_round": 0})
    assert_published(fed, good, {"mallory": "claims num_samples=1001, above max_num_samples=1000"})


def test_max_client_share_caps_a_clients_weight_and_says_so(fed):
    fed.cfg = dataclasses.replace(fed.cfg, max_client_share=0.5)
    state, _ = fed.store.read_round(0)
    payloads = {c: random_payload(fed.cfg, state, fed.model, c, s) for c, s in (("alice", 1), ("bob", 2), ("mallory", 3))}
    for client, n in (("alice", 4), ("bob", 4), ("mallory", 1_000_000)):
        fed.client(client).submit_update(0, client, payloads[client], {"num_samples": n, "base_round": 0})
    assert aggregate_round(fed.store, fed.cfg, clients=CLIENTS) == 1
    meta = fed.store.history()[1]
    by = {c["client_id"]: c for c in meta["contributions"]}
    assert by["mallory"]["num_samples"] == 1_000_000 and by["mallory"]["weight_samples"] == 8  # 8 = 0.5 x (4 + 4 + 8)
    assert "weight_samples" not in by["alice"] and "weight_samples" not in by["bob"]
    expected = get_strategy(fed.cfg).aggregate(state, [("alice", payloads["alice"], 4), ("bob", payloads["bob"], 4),
                                                       ("mallory", payloads["mallory"], 8)])
    published, _ = fed.store.read_round(1)
    for key, value in expected.tensors.items():
        torch.testing.assert_close(published.tensors[key], value)


def test_share_caps_are_the_largest_that_keep_every_share_within_the_bound():
    rng = random.Random(0)
    cfg = FederatedLoraConfig(strategy="fedit", r=2, target_modules=["q"], max_client_share=0.3)
    for _ in range(300):
        cfg.max_client_share = rng.choice([0.2, 0.3, 0.5, 0.9])
        counts = {f"c{i}": rng.choice([1, 3, 10, 1000, 10**6, rng.randint(1, 10**7)]) for i in range(rng.randint(2, 8))}
        caps = _share_caps(counts, cfg)
        weights = {c: caps.get(c, n) for c, n in counts.items()}
        if cfg.max_client_share * len(counts) < 1:
            assert caps == {}  # no weighting can meet the bound: left as it is
            continue
        assert max(weights.values()) <= cfg.max_client_share * sum(weights.values())
        if caps:  # the cap is the largest integer that keeps the bound
            t = next(iter(caps.values()))
            assert all(n > t for c, n in counts.items() if c in caps)
            assert t + 1 > cfg.max_client_share * sum(min(n, t + 1) for n in counts.values())


@pytest.mark.parametrize("order", ["copier sorts first", "copier sorts last"])
def test_a_copy_of_another_clients_update_is_never_credited(fed, order):
    author, copier = ("bob", "alice") if order == "copier sorts first" else ("alice", "bob")
    good = {author: honest(fed, author, 1), "carol": honest(fed, "carol", 2)}
    time.sleep(0.01)  # the store's clock orders the commits (the loopback Hub records milliseconds)
    weights = (fed.store.root / "updates" / author / "round-0000/update.safetensors").read_bytes() if fed.kind == "local" else \
        fed.store.update_file(0, author)[0].read_bytes()
    upload_raw(fed, copier, weights, record_for(fed, copier, weights))
    meta = assert_published(fed, good, {copier: f"byte for byte the update of {author!r}: an update counts once, and "
                                                f"{author!r} committed it first"})
    assert "each client must submit its own training" in meta["refused"][0]["reason"].lower()


class _NoClockStore(LocalStore):
    """A local store that cannot say when it received an update (as a store without commit times)."""

    def committed_at(self, round: int, client_id: str):
        return None


def test_copies_a_store_cannot_order_are_all_refused(tmp_path):
    fed = Federation("local", tmp_path, None)
    fed.store = _NoClockStore(fed.store.root)
    good = {"carol": honest(fed, "carol", 2)}
    payload = honest(fed, "alice", 1)
    fed.store.submit_update(0, "bob", payload, {"num_samples": 4, "base_round": 0})
    assert_published(fed, good, {c: "cannot tell which was committed first, so none of them is credited" for c in ("alice", "bob")})


# ---- the inputs that crashed the aggregator, against the real command ---------------------------------------------
CRASHERS = [  # round -> mallory's update.json (as raw bytes from an honest record), the reason's words
    (lambda r: json.dumps({**r, "num_samples": 10**400}).encode(), "above max_num_samples"),
    (lambda r: json.dumps({**r, "metrics": {"train_loss": 10**400}}).encode(), "magnitude must be at most"),
    (lambda r: json.dumps({**r, "metrics": "fast"}).encode(), "metrics of type str"),
    (lambda r: nested(200_000), "above max_update_json_bytes"),
]


@pytest.mark.slow
def test_the_aggregator_process_survives_every_crashing_input_and_publishes_each_round(tmp_path, monkeypatch):
    import hashlib

    from helpers import isolate_hub_client
    from huggingface_hub import CommitOperationAdd, HfApi

    isolate_hub_client(monkeypatch, tmp_path, disable_xet=True)  # the process Hub speaks plain git-LFS

    rounds = len(CRASHERS)
    with ProcessFederation(tmp_path, ["alice", "bob", "mallory"], rounds, ["--deadline", "120"]) as fed:
        fed.start_aggregator()
        for client in ("alice", "bob"):
            fed.start_client(client)
        reader, api = fed.store(), HfApi(endpoint=fed.url, token="tok-mallory")
        api.create_repo(f"{REPO}-updates-mallory", exist_ok=True)
        for r, (make, _) in enumerate(CRASHERS):
            deadline = time.monotonic() + 240
            while (latest := reader.latest_round()) is None or latest < r:
                assert time.monotonic() < deadline and fed.alive("aggregator"), fed.log("aggregator")[-3000:]
                time.sleep(0.3)
            state, _ = reader.read_round(r)
            start = get_strategy(FederatedLoraConfig(strategy="fedit", r=4, target_modules=["query", "value"])) \
                .client_start(state, "mallory", 4)
            weights = save_bytes({k: v.contiguous() for k, v in start.items()})
            record = {"round": r, "client_id": "mallory", "base_round": r, "base_commit": reader._commit(r),
                      "num_samples": 8, "sha256": hashlib.sha256(weights).hexdigest()}
            api.create_commit(f"{REPO}-updates-mallory", [
                CommitOperationAdd(f"round-{r:04d}/update.safetensors", weights),
                CommitOperationAdd(f"round-{r:04d}/update.json", make(record))], commit_message="hostile")
        assert fed.wait("aggregator", 300) == 0, fed.log("aggregator")[-3000:]
        for client in ("alice", "bob"):
            assert fed.wait(client, 60) == 0, fed.log(client)[-3000:]
        history = reader.history()
    assert [h["round"] for h in history] == list(range(rounds + 1))
    for h, (_, reason) in zip(history[1:], CRASHERS):
        assert [c["client_id"] for c in h["contributions"]] == ["alice", "bob"]
        assert [r["client_id"] for r in h["refused"]] == ["mallory"] and reason in h["refused"][0]["reason"], h["refused"]


class _OddStore(LocalStore):
    """A local store where reading one client's files raises `error` (as odd files on some file system could)."""

    def __init__(self, root, client: str, error: BaseException) -> None:
        super().__init__(root)
        self.client, self.error = client, error

    def update_file(self, round, client_id, max_bytes=None, max_meta_bytes=None):
        if client_id == self.client:
            raise self.error
        return super().update_file(round, client_id, max_bytes, max_meta_bytes)


def test_any_exception_from_a_clients_files_refuses_it_and_a_store_fault_stops_the_round(tmp_path):
    from peft_federated.hub_integration.store import StoreUnavailableError

    fed = Federation("local", tmp_path, None)
    good = {"alice": honest(fed, "alice", 1)}
    honest(fed, "mallory", 3)
    fed.store = _OddStore(fed.store.root, "mallory", KeyError("dtype"))
    assert_published(fed, good, {"mallory": "could not be read (KeyError: 'dtype'); the client must resubmit"})
    fed2 = Federation("local", tmp_path / "second", None)
    honest(fed2, "alice", 1)
    fed2.store = _OddStore(fed2.store.root, "alice", StoreUnavailableError("the disk is gone"))
    with pytest.raises(StoreUnavailableError, match="the disk is gone"):
        aggregate_round(fed2.store, fed2.cfg, clients=CLIENTS)
    assert fed2.store.latest_round() == 0  # nothing published from a round the store could not read

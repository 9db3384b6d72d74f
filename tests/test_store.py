"""The local folder store: Hub layout on disk, atomic publishing, safe client ids, verified updates."""

from __future__ import annotations

import pytest
import torch
from helpers import make_config, make_model
from peft import PeftModel

from peft_federated import get_strategy
from peft_federated.aggregator import aggregate_round, initialize
from peft_federated.hub_integration import LocalStore, RoundAlreadyPublishedError, check_client_id


@pytest.fixture
def fed(tmp_path):
    cfg = make_config("fedit", r=2)
    store = LocalStore(tmp_path / "store")
    model = make_model(cfg)
    initialize(store, cfg, model)
    return cfg, store, model


def payload(cfg, store, model, client, seed):
    state, _ = store.read_round()
    g = torch.Generator().manual_seed(seed)
    cr = get_strategy(cfg).prepare_client(model, state, client)
    return {k: torch.randn(v.shape, generator=g) for k, v in cr.payload().items()}


def test_round_zero_is_a_plain_peft_folder(fed):
    from helpers import TinyNet

    cfg, store, _ = fed
    assert store.latest_round() == 0
    PeftModel.from_pretrained(TinyNet(), store.round_path(0))
    assert (store.round_path(0) / "README.md").read_text().startswith("---\nlibrary_name: peft")


def test_a_round_is_published_once(fed):
    cfg, store, _ = fed
    state, _ = store.read_round(0)
    with pytest.raises(RoundAlreadyPublishedError):
        store.publish_round(state, cfg, {})
    state.round = 5
    with pytest.raises(ValueError, match="the next round in .* is 1"):
        store.publish_round(state, cfg, {})
    assert store.latest_round() == 0 and not list(store.root.glob(".publish-*"))


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\b", "", ".hidden", "x" * 97, "a..b", None])
def test_client_ids_with_path_characters_are_refused(fed, bad):
    cfg, store, model = fed
    with pytest.raises(ValueError, match="Invalid client id"):
        check_client_id(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError, match="Invalid client id"):
            store.submit_update(0, bad, {"x": torch.zeros(1)}, {"num_samples": 1, "base_round": 0})
    assert list((store.root / "updates").iterdir()) == []


def test_aggregation_refuses_tampered_stale_and_unregistered_updates_and_keeps_the_rest(fed):
    cfg, store, model = fed
    good = payload(cfg, store, model, "alice", 1)
    store.submit_update(0, "alice", good, {"num_samples": 4, "base_round": 0})
    store.submit_update(0, "bob", payload(cfg, store, model, "bob", 2), {"num_samples": 4, "base_round": 0})
    store.submit_update(0, "carol", payload(cfg, store, model, "carol", 3), {"num_samples": 4, "base_round": 7})
    store.submit_update(0, "mallory", payload(cfg, store, model, "mallory", 4), {"num_samples": 4, "base_round": 0})
    tampered = store.root / "updates" / "bob" / "round-0000" / "update.safetensors"
    tampered.write_bytes(tampered.read_bytes()[:-8] + b"\x00" * 8)
    assert aggregate_round(store, cfg, clients=["alice", "bob", "carol"]) == 1
    meta = store.history()[1]
    assert [c["client_id"] for c in meta["contributions"]] == ["alice"]
    reasons = {r["client_id"]: r["reason"] for r in meta["refused"]}
    assert "sha256" in reasons["bob"] and "trained from round 7" in reasons["carol"]
    assert "not a registered client" in reasons["mallory"]
    state, _ = store.read_round(1)
    for key, value in good.items():
        torch.testing.assert_close(state.tensors[key], value)

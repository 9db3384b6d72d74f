"""FederatedTrainer and the simulation: real Trainer loop, local store, resume, LR schedule."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import accuracy, federate, tiny_args, tiny_bert, tiny_config, token_dataset

from peft_federated.adapter import lora_layers
from peft_federated.hub_integration import LocalStore
from peft_federated.trainer import FederatedTrainer, run_simulation, sample_clients


def clients(n=4, size=40):
    return {f"c{k}": token_dataset(size, k, label_bias=k % 3) for k in range(n)}


def test_simulation_publishes_plain_peft_rounds_results_and_plot(tmp_path):
    cfg = tiny_config("rolora", num_rounds=3, clients_per_round=3)
    res = run_simulation(tiny_bert(cfg), cfg, clients(), tiny_args(tmp_path), tmp_path / "store",
                         eval_dataset=token_dataset(60, 99), compute_metrics=accuracy, progress=False)
    assert [h["round"] for h in res.history] == [0, 1, 2, 3]
    for h in res.history[1:]:
        assert len(h["contributions"]) == 3 and all(len(c["sha256"]) == 64 for c in h["contributions"])
        assert "eval_accuracy" in h["metrics"]
    assert json.loads(res.results_json.read_text())["rounds"][-1]["round"] == 3
    assert res.plot.read_bytes()[:4] == b"\x89PNG"
    card = (tmp_path / "store" / "rounds" / "round-0003" / "README.md").read_text()
    assert "rolora" in card and 'revision="round-0003"' in card and "| 3 | 3 |" in card


def test_client_sampling_is_seeded_by_round():
    ids = [f"c{k}" for k in range(10)]
    assert sample_clients(ids, 4, 0, 3) == sample_clients(list(reversed(ids)), 4, 0, 3)
    assert len({tuple(sample_clients(ids, 4, 0, r)) for r in range(6)}) > 1


@pytest.mark.parametrize("strategy", ["rolora", "fedex"])
def test_killed_simulation_resumes_to_the_same_result(tmp_path, strategy):
    cfg = tiny_config(strategy, num_rounds=3, clients_per_round=3)
    data = clients()
    full = run_simulation(tiny_bert(cfg), cfg, data, tiny_args(tmp_path / "a"), tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of round 1
        run_simulation(tiny_bert(cfg), cfg, data, tiny_args(tmp_path / "b"), tmp_path / "b", progress=False, stop_after_clients=5)
    assert LocalStore(tmp_path / "b").latest_round() == 1
    resumed = run_simulation(tiny_bert(cfg), cfg, data, tiny_args(tmp_path / "b"), tmp_path / "b", progress=False)
    a, _ = full.store.read_round(3)
    b, _ = resumed.store.read_round(3)
    for key in a.tensors:
        torch.testing.assert_close(b.tensors[key], a.tensors[key], rtol=0, atol=1e-6)
    assert set(a.base_delta) == set(b.base_delta)
    assert [c["client_id"] for h in full.history for c in h["contributions"]] == \
           [c["client_id"] for h in resumed.history for c in h["contributions"]]


def test_regulariser_and_rank_mask_reach_the_trainer_loop(tmp_path):
    """HetLoRA through the real Trainer: a rank-2 client leaves ranks 2.. of its model at zero."""
    cfg = tiny_config("hetlora", num_rounds=1, client_ranks={"c0": 2}, hetlora_reg=0.1)
    model = tiny_bert(cfg)
    trainer = FederatedTrainer(model=model, args=tiny_args(tmp_path), train_dataset=token_dataset(40, 0),
                               federated_config=cfg, client_id="c0")
    state = trainer.strategy.initial_state(model)
    payload, n, metrics = trainer.train_round(state)
    assert n == 40 and metrics["train_loss"] > 0
    for name, layer in lora_layers(model).items():
        assert torch.count_nonzero(layer.lora_A["default"].weight[2:]) == 0
        assert torch.count_nonzero(layer.lora_B["default"].weight[:, 2:]) == 0
        assert payload[f"base_model.model.{name}.lora_A.weight"].shape[0] in (1, 2)


def test_learning_rate_schedule_spans_the_federation(tmp_path):
    cfg = tiny_config("fedit", num_rounds=4, local_steps=5)
    model = tiny_bert(cfg)
    trainer = FederatedTrainer(model=model, args=tiny_args(tmp_path, lr_scheduler_type="linear"),
                               train_dataset=token_dataset(40, 0), federated_config=cfg, client_id="c0")
    state = trainer.strategy.initial_state(model)
    first_lrs = []
    for r in range(4):
        state.round = r
        trainer.train_round(state)
        first_lrs.append(trainer.lr_scheduler.get_last_lr()[0])
    # linear decay over 4 x 5 steps: the lr at the end of each round keeps falling, reaching 0 at the end
    assert all(a > b for a, b in zip(first_lrs, first_lrs[1:]))
    assert first_lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert first_lrs[0] == pytest.approx(5e-3 * 15 / 20)


def test_clients_and_aggregator_coordinate_only_through_the_store(tmp_path):
    cfg = tiny_config("fedex", num_rounds=2, local_steps=2)
    ids = ["alice", "bob"]
    store, _, _ = federate(tmp_path, cfg, ids)
    assert store.latest_round() == 2
    for r in (1, 2):
        meta = store.history()[r]
        assert sorted(c["client_id"] for c in meta["contributions"]) == ids and meta["refused"] == []


def test_a_client_is_told_why_its_update_was_refused(tmp_path, caplog):
    """A client whose update the aggregator refused reads the reason in the next published round and
    warns with it; the client whose update counted hears nothing."""
    import logging
    import threading

    from peft_federated.aggregator import initialize, serve

    cfg = tiny_config("fedit", num_rounds=1, local_steps=1, max_num_samples=10)
    store = LocalStore(tmp_path / "fed")
    initialize(store, cfg, tiny_bert(cfg))
    trainers = [FederatedTrainer(model=tiny_bert(cfg), args=tiny_args(tmp_path / cid), train_dataset=token_dataset(n, k),
                                 federated_config=cfg, client_id=cid, store=store, poll_interval=0.05, round_timeout=60)
                for k, (cid, n) in enumerate([("alice", 30), ("bob", 8)])]  # alice claims 30 samples: above 10
    caplog.set_level(logging.WARNING, logger="peft_federated.trainer.trainer")
    threads = [threading.Thread(target=serve, args=(store, cfg, ["alice", "bob"]), kwargs={"poll_interval": 0.05, "deadline": 60},
                                daemon=True)] + [threading.Thread(target=t.train) for t in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    _, meta = store.read_round(1)
    assert [c["client_id"] for c in meta["contributions"]] == ["bob"] and meta["refused"][0]["client_id"] == "alice"
    told = [r.getMessage() for r in caplog.records if r.name == "peft_federated.trainer.trainer"]
    assert len(told) == 1 and told[0].startswith("The aggregator refused alice's update for round 0 (it is not in round 1)")
    assert "above max_num_samples=10" in told[0]

"""Personalization as a capability, through the real parts: FederatedTrainer rounds through a local
store, restarts, the simulation (one shared model object), the client role from the command line,
plain-PEFT loading of the shared part with `load_personal` over it, per-client evaluation, DP, and
personal tensors that do not fit refused with the reason. FedSA-LoRA is the personalized strategy;
one test declares another (FedIT with a personal head) to show that everything acts on the
declaration, not on a strategy's name."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from test_hub_federation import save_base_model
from tiny import accuracy, federate, tiny_args, tiny_bert, tiny_config, token_dataset
from transformers import AutoModelForSequenceClassification, Trainer

from peft_federated import STRATEGIES, FederatedLoraConfig, GlobalState, cli, get_strategy, load_personal
from peft_federated.adapter import read_tensors
from peft_federated.aggregator import aggregate_round
from peft_federated.hub_integration import LocalStore
from peft_federated.personal import PersonalTensorsError, client_folder, read_snapshot, snapshot_rounds, write_personal
from peft_federated.roles import federation_config, run_client, start_aggregator
from peft_federated.state import lora_key
from peft_federated.strategies import FedIT, Strategy
from peft_federated.trainer import FederatedTrainer, run_simulation

IDS = torch.tensor(token_dataset(8, 3)["input_ids"])


class Rounds:
    """Every client round a trainer trains: (client id, round, the model's tensors when its training
    starts, and when it ends), spied on `FederatedTrainer.train_round` and `Strategy.prepare_client`."""

    def __init__(self, monkeypatch) -> None:
        self.rounds: list[tuple[str, int, dict, dict]] = []
        self._start: dict[int, dict] = {}  # per model object: trainers may train in threads at once
        prepare, train_round = Strategy.prepare_client, FederatedTrainer.train_round

        def spy_prepare(strategy, model, state, client_id, personal=None):
            client_round = prepare(strategy, model, state, client_id, personal=personal)
            if self._start.get(id(model), {}) is None:  # the first preparation inside train_round
                self._start[id(model)] = read_tensors(model)
            return client_round

        def spy_train_round(trainer, state):
            self._start[id(trainer.model)] = None
            out = train_round(trainer, state)
            self.rounds.append((trainer.client_id, state.round, self._start.pop(id(trainer.model)), read_tensors(trainer.model)))
            return out

        monkeypatch.setattr(Strategy, "prepare_client", spy_prepare)
        monkeypatch.setattr(FederatedTrainer, "train_round", spy_train_round)


def personal_of(tensors: dict, keys: list[str]) -> dict:
    return {k: tensors[k] for k in keys}


def assert_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def plain_peft(cfg, folder) -> PeftModel:
    """A published round loaded with plain PEFT on the untouched base model (tiny_bert's seed 0)."""
    return PeftModel.from_pretrained(tiny_bert(cfg).unload(), str(folder)).eval()


# ---- FederatedTrainer through a store ----------------------------------------------------------------

def test_trainer_federation_keeps_each_clients_part_home_and_publishes_the_shared_part(tmp_path, monkeypatch):
    cfg = tiny_config("fedsa", num_rounds=2, local_steps=2)
    spy = Rounds(monkeypatch)
    store, trainers, _ = federate(tmp_path, cfg)
    s = get_strategy(cfg)
    state0, _ = store.read_round(0)
    keys = s.personal_keys(state0)
    assert any("classifier" in k for k in keys) and sum("lora_B" in k for k in keys) == len(state0.modules())
    shared = {lora_key(m, "lora_A") for m in state0.modules()}
    updates = sorted((store.root / "updates").rglob("update.safetensors"))
    assert len(updates) == 4
    for path in updates:  # no upload holds lora_B or the head
        with safe_open(str(path), "pt") as f:
            assert set(f.keys()) == shared, path
    model = tiny_bert(cfg)
    for rnd in range(cfg.num_rounds + 1):  # the shared part: plain PEFT loads every round
        state, _ = store.read_round(rnd)
        assert_equal(personal_of(state.tensors, keys), personal_of(state0.tensors, keys), f"round {rnd}: B = 0, round 0's head")
        assert rnd == 0 or not torch.equal(state.tensors[sorted(shared)[0]], state0.tensors[sorted(shared)[0]])
        s.prepare_client(model, state, "global").close()
        torch.testing.assert_close(logits(plain_peft(cfg, store.round_path(rnd))), logits(model), rtol=1e-5, atol=1e-5)
    ended = {}
    for trainer in trainers:
        folder = client_folder(trainer.personal_dir, trainer.client_id)
        assert folder == tmp_path / trainer.client_id / "trainer" / "personal" / trainer.client_id
        assert snapshot_rounds(folder) == [1, 2]  # the one round 1 started from, and the last
        mine = {r: (start, end) for c, r, start, end in spy.rounds if c == trainer.client_id}
        assert sorted(mine) == [0, 1]
        state1, _ = store.read_round(1)
        assert_equal(personal_of(mine[0][0], keys), personal_of(state0.tensors, keys), "round 0 starts from the shared model")
        assert_equal(personal_of(mine[1][0], keys), personal_of(mine[0][1], keys), "round 1 starts from what round 0 ended with")
        assert_equal(personal_of(mine[1][0], sorted(shared)), personal_of(state1.tensors, sorted(shared)), "the global A")
        for r in (1, 2):
            assert_equal(read_snapshot(folder, r)[0], personal_of(mine[r - 1][1], keys), f"snapshot {r}")
        ended[trainer.client_id] = personal_of(mine[1][1], keys)
    assert not torch.equal(*(ended[c][keys[0]] for c in ("alice", "bob")))  # kept apart

    card = (store.round_path(2) / "README.md").read_text()  # the card says what a round holds and what stays home
    assert "personalized: each client keeps its own lora_B and the modules_to_save" in card and "load_personal" in card
    from peft_federated.hub_integration.model_card import render_model_card

    assert "personalized:" not in render_model_card(tiny_config("fedit"), [])
    trainer, final = trainers[0], store.read_round(2)[0]
    global_metrics = trainer.evaluate()  # after train(): the federation's global model
    with trainer.personalized() as model:
        assert_equal(personal_of(read_tensors(model), keys), ended["alice"], "personalized: alice's part")
        personal_metrics, want = trainer.evaluate(), logits(model)
        model.save_pretrained(str(tmp_path / "alice-personalized"))  # one plain PEFT adapter of her model
    assert_equal(read_tensors(trainer.model), final.tensors, "after the block: the global round again")
    assert personal_metrics["eval_loss"] != global_metrics["eval_loss"]
    loaded = plain_peft(cfg, store.round_path(2))
    meta = load_personal(loaded, client_folder(trainer.personal_dir, "alice"))
    assert (meta["client_id"], meta["strategy"], meta["round"]) == ("alice", "fedsa", 2)
    torch.testing.assert_close(logits(loaded), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(plain_peft(cfg, tmp_path / "alice-personalized")), want, rtol=1e-5, atol=1e-5)


def fresh_trainer(tmp_path, cfg, client_id, k):
    """A client (re)started: a new model object on the same base weights, with the same output folder."""
    return FederatedTrainer(model=tiny_bert(cfg), args=tiny_args(tmp_path / client_id), train_dataset=token_dataset(30, k),
                            federated_config=cfg, client_id=client_id)


def test_a_restarted_trainer_starts_from_the_part_it_saved(tmp_path, monkeypatch):
    cfg = tiny_config("fedsa", num_rounds=2, local_steps=2)
    s = get_strategy(cfg)
    state0 = s.initial_state(tiny_bert(cfg))
    keys = s.personal_keys(state0)
    spy = Rounds(monkeypatch)
    first, n, _ = fresh_trainer(tmp_path, cfg, "alice", 0).train_round(state0)
    bob, _, _ = fresh_trainer(tmp_path, cfg, "bob", 1).train_round(state0)
    folder = client_folder(tmp_path / "alice" / "trainer" / "personal", "alice")
    ended, meta = read_snapshot(folder, 1)
    assert (meta["client_id"], meta["strategy"], meta["round"], meta["trained_round"]) == ("alice", "fedsa", 1, 0)
    assert_equal(ended, personal_of(spy.rounds[0][3], keys), "the snapshot is what round 0 ended with")

    # killed before its update was submitted: round 0 again, from the same start, to the same update and part
    again, _, _ = fresh_trainer(tmp_path, cfg, "alice", 0).train_round(state0)
    assert_equal(again, first, "round 0 trained again")
    assert_equal(read_snapshot(folder, 1)[0], ended, "its part, written again")

    state1 = s.aggregate(state0, [("alice", first, n), ("bob", bob, n)])
    for attempt in range(2):  # restarted, then restarted again before round 1's update was submitted
        fresh_trainer(tmp_path, cfg, "alice", 0).train_round(state1)
        start = spy.rounds[-1][2]
        assert_equal(personal_of(start, keys), ended, f"attempt {attempt}: round 1 starts from the saved part")
        assert all(torch.equal(start[k], state1.tensors[k]) for k in first)
        assert snapshot_rounds(folder) == [1, 2]


# ---- the simulation ----------------------------------------------------------------------------------

def clients(n=3):
    data = {f"c{k}": token_dataset(30, k, label_bias=k % 3) for k in range(n)}
    tests = {f"c{k}": token_dataset(24, 50 + k, label_bias=k % 3) for k in range(n)}
    return data, tests


def simulate(tmp_path, cfg, store="store", **kw):
    data, tests = clients(kw.pop("n", 3))
    return run_simulation(tiny_bert(cfg), cfg, data, tiny_args(tmp_path), tmp_path / store, eval_dataset=token_dataset(30, 99),
                          compute_metrics=accuracy, client_eval_datasets=tests, progress=False, **kw)


def test_simulation_keeps_clients_apart_and_scores_each_on_its_own_split(tmp_path, monkeypatch):
    """Clients share one model object: each round still starts from the client's own part (or, for a
    client yet to train, from B = 0 and round 0's head), never from the client trained just before."""
    cfg = tiny_config("fedsa", num_rounds=3, local_steps=2, clients_per_round=2)
    spy = Rounds(monkeypatch)
    res = simulate(tmp_path, cfg)
    state0, _ = res.store.read_round(0)
    keys = get_strategy(cfg).personal_keys(state0)
    last: dict[str, dict] = {}
    for client, rnd, start, end in spy.rounds:
        want = last.get(client, personal_of(state0.tensors, keys))
        assert_equal(personal_of(start, keys), want, f"{client} round {rnd}")
        last[client] = personal_of(end, keys)
    assert len(spy.rounds) == 6 and len(last) == 3  # someone missed a round, or joined late
    assert any(a[0] != b[0] and not torch.equal(a[3][keys[0]], b[3][keys[0]]) for a, b in zip(spy.rounds, spy.rounds[1:]))

    rounds = json.loads(res.results_json.read_text())["rounds"]
    for h, saved in zip(res.history, rounds):
        per_client, metrics = h["client_eval"], h["metrics"]
        assert sorted(per_client) == ["c0", "c1", "c2"] and saved["client_eval"] == per_client
        accuracies, losses = [per_client[c]["eval_accuracy"] for c in per_client], [per_client[c]["eval_loss"] for c in per_client]
        assert metrics["eval_personal_mean_accuracy"] == pytest.approx(sum(accuracies) / 3, rel=1e-12)  # unweighted
        assert metrics["eval_personal_worst_accuracy"] == min(accuracies)
        assert metrics["eval_personal_worst_loss"] == max(losses)
        assert "eval_accuracy" in metrics and not any("runtime" in k for k in metrics if "personal" in k)
    assert res.final_client_metrics == res.history[-1]["client_eval"]

    # the figure for c1 is its personalized model's: the plain-PEFT round 3 with c1's part over it
    model = plain_peft(cfg, res.store.round_path(3))
    load_personal(model, client_folder(tmp_path / "trainer" / "personal", "c1"))
    _, tests = clients()
    scored = Trainer(model=model, args=tiny_args(tmp_path / "check"), compute_metrics=accuracy).evaluate(tests["c1"])
    assert scored["eval_accuracy"] == res.final_client_metrics["c1"]["eval_accuracy"]
    assert scored["eval_loss"] == pytest.approx(res.final_client_metrics["c1"]["eval_loss"], rel=1e-5)


def final_parts(tmp_path, ids=("c0", "c1", "c2")):
    parts = {}
    for c in ids:
        folder = client_folder(tmp_path / "trainer" / "personal", c)
        parts[c] = read_snapshot(folder, snapshot_rounds(folder)[-1])
    return parts


def test_a_killed_simulation_resumes_to_the_same_parts_and_a_new_one_forgets_them(tmp_path):
    cfg = tiny_config("fedsa", num_rounds=3, local_steps=2, clients_per_round=2)
    full = simulate(tmp_path / "a", cfg)
    with pytest.raises(KeyboardInterrupt):  # killed in the middle of round 1
        simulate(tmp_path / "b", cfg, stop_after_clients=3)
    resumed = simulate(tmp_path / "b", cfg)
    want = final_parts(tmp_path / "a")
    s, g = get_strategy(cfg), torch.Generator().manual_seed(0)
    for c, (tensors, _) in want.items():  # another federation's parts, left in the output folder
        write_personal(client_folder(tmp_path / "a" / "trainer" / "personal", c), 1,
                       {k: torch.randn(v.shape, generator=g) for k, v in tensors.items()}, s, c)
    again = simulate(tmp_path / "a", cfg, store="store-2")  # a new federation there starts without them
    for other in (resumed, again):
        for h, h_full in zip(other.history, full.history, strict=True):
            assert h["client_eval"].keys() == h_full["client_eval"].keys()
            for c, m in h["client_eval"].items():
                assert m["eval_loss"] == pytest.approx(h_full["client_eval"][c]["eval_loss"], abs=1e-5), (h["round"], c)
    for c, (tensors, meta) in final_parts(tmp_path / "b").items():
        assert meta["round"] == want[c][1]["round"]
        for key in tensors:
            torch.testing.assert_close(tensors[key], want[c][0][key], rtol=0, atol=1e-6)


def test_under_dp_the_per_client_figures_stay_out_of_the_published_rounds(tmp_path):
    cfg = tiny_config("fedsa", num_rounds=1, local_steps=1, weighting="uniform", dp_noise_multiplier=0.5, dp_clip_norm=1.0,
                      dp_num_clients=3, clients_per_round=3, dp_delta=1e-3, dp_seed=0)
    res = simulate(tmp_path, cfg)
    for rnd in (0, 1):
        meta = json.loads((res.store.round_path(rnd) / "federation.json").read_text())
        assert "client_eval" not in meta and not any("personal" in k for k in meta["metrics"]), meta
        assert "dp" in meta
    assert sorted(res.history[-1]["client_eval"]) == ["c0", "c1", "c2"]
    assert "eval_personal_mean_accuracy" in json.loads(res.results_json.read_text())["rounds"][-1]["metrics"]


class FedITOwnHead(FedIT):
    """FedIT whose classification head is personal: every factor shared, each client's head its own."""

    name = "fedit_own_head"
    personal_extras = True


def test_trainer_and_simulation_act_on_the_declaration_not_on_a_name(tmp_path, monkeypatch):
    monkeypatch.setitem(STRATEGIES, FedITOwnHead.name, FedITOwnHead)
    cfg = tiny_config(FedITOwnHead.name, num_rounds=2, local_steps=2, clients_per_round=2)
    res = simulate(tmp_path, cfg, n=2)
    (state0, _), (state2, _) = res.store.read_round(0), res.store.read_round(2)
    heads = [k for k in state0.tensors if "classifier" in k]
    assert heads and get_strategy(cfg).personal_keys(state0) == heads
    for key in state0.tensors:  # the factors are averaged; the head stays round 0's
        assert torch.equal(state2.tensors[key], state0.tensors[key]) == (key in heads), key
    for c, (tensors, _) in final_parts(tmp_path, ("c0", "c1")).items():
        assert sorted(tensors) == sorted(heads) and not torch.equal(tensors[heads[0]], state0.tensors[heads[0]])
    assert all(sorted(h["client_eval"]) == ["c0", "c1"] for h in res.history)


# ---- personal tensors that do not fit -------------------------------------------------------------

def test_personal_tensors_that_do_not_fit_are_refused_with_the_reason(tmp_path):
    cfg = tiny_config("fedsa", num_rounds=2, local_steps=1)
    s = get_strategy(cfg)
    state0 = s.initial_state(tiny_bert(cfg))
    fresh_trainer(tmp_path, cfg, "bob", 1).train_round(state0)
    bob = client_folder(tmp_path / "bob" / "trainer" / "personal", "bob")
    alice = client_folder(tmp_path / "alice" / "trainer" / "personal", "alice")
    shutil.copytree(bob, alice)  # another client's part in alice's folder
    with pytest.raises(PersonalTensorsError, match="client 'bob' under 'fedsa', not of 'alice'"):
        fresh_trainer(tmp_path, cfg, "alice", 0).train_round(GlobalState(1, state0.tensors))
    shutil.rmtree(alice)
    tensors, _ = read_snapshot(bob, 1)
    wrong = {k: v[:, :2].contiguous() if "lora_B" in k else v for k, v in tensors.items()}  # another federation's rank
    write_personal(alice, 1, wrong, s, "alice")
    with pytest.raises(PersonalTensorsError, match=r"lora_B.weight is torch.float32 \(\d+, 2\), the federation's is .* give this one another personal_dir"):
        fresh_trainer(tmp_path, cfg, "alice", 0).train_round(GlobalState(1, state0.tensors))
    (alice / "round-0001" / "personal.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(PersonalTensorsError, match="not a readable safetensors file.*Delete"):
        fresh_trainer(tmp_path, cfg, "alice", 0).train_round(GlobalState(1, state0.tensors))
    # the same client, strategy and shapes, but saved from another federation's store
    write_personal(alice, 1, tensors, s, "alice", federation=str((tmp_path / "federation-a").resolve()))

    def in_store(name):
        return FederatedTrainer(model=tiny_bert(cfg), args=tiny_args(tmp_path / "alice"), train_dataset=token_dataset(30, 0),
                                federated_config=cfg, client_id="alice", store=LocalStore(tmp_path / name))

    with pytest.raises(PersonalTensorsError, match="of the federation '.*federation-a', not of '.*federation-b': give this "
                                                   "federation its own personal_dir"):
        in_store("federation-b").train_round(GlobalState(1, state0.tensors))
    in_store("federation-a").train_round(GlobalState(1, state0.tensors))  # its own store: taken
    assert read_snapshot(alice, 2)[1]["federation"] == str((tmp_path / "federation-a").resolve())
    small = tiny_bert(FederatedLoraConfig(strategy="fedsa", r=2, lora_alpha=4, task_type="SEQ_CLS",
                                          target_modules=["query", "value", "intermediate.dense"]))
    with pytest.raises(PersonalTensorsError, match="load a round of the same federation"):
        load_personal(small, bob)
    with pytest.raises(FileNotFoundError, match="holds no personal tensors"):
        load_personal(tiny_bert(cfg), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="call train\\(\\) first"):
        with fresh_trainer(tmp_path, cfg, "bob", 1).personalized():
            pass



def test_snapshots_keep_the_round_started_from_and_drop_the_rest(tmp_path):
    s = get_strategy(tiny_config("fedsa"))
    folder = tmp_path / "alice"
    part = {"base_model.model.classifier.weight": torch.ones(3, 16)}
    for r in (3, 7, 9):  # another federation's, later than anything this one has trained
        write_personal(folder, r, part, s, "alice")
    assert snapshot_rounds(folder) == [9]
    (folder / ".personal-left-by-a-kill").mkdir()
    write_personal(folder, 1, part, s, "alice")  # round 0 trained: only its snapshot is left
    assert snapshot_rounds(folder) == [1] and not list(folder.glob(".personal-*"))
    write_personal(folder, 2, part, s, "alice", keep_from=1)
    write_personal(folder, 5, part, s, "alice", keep_from=2)  # missed rounds 2-3, trained round 4 from round-0002
    assert snapshot_rounds(folder) == [2, 5]
    write_personal(folder, 6, {k: 2 * v for k, v in part.items()}, s, "alice", keep_from=5)
    assert snapshot_rounds(folder) == [5, 6] and torch.equal(read_snapshot(folder, 6)[0]["base_model.model.classifier.weight"], 2 * part["base_model.model.classifier.weight"])


# ---- the client role -------------------------------------------------------------------------------

def test_the_client_role_keeps_its_part_in_its_output_folder_across_a_restart(tmp_path, monkeypatch):
    """`peft-federated client` over a local store: it trains round 0, stops while waiting for round 1
    (its round timeout), restarts, and trains round 1 from exactly the part it saved; nothing personal
    is in an update, and plain PEFT plus `load_personal` gives the client's model at the end."""
    model_dir = save_base_model(tmp_path / "base-model")
    root = tmp_path / "store"
    store = LocalStore(root)
    cfg = tiny_config("fedsa", num_rounds=2, local_steps=2, base_model_name_or_path=str(model_dir))
    start_aggregator(store, cfg, str(model_dir))
    config = federation_config(store)
    data = {}
    for k, c in enumerate(("alice", "bob")):
        data[c] = tmp_path / f"{c}-data"
        token_dataset(30, k, label_bias=k).rename_column("labels", "label").save_to_disk(str(data[c]))
    spy = Rounds(monkeypatch)

    def alice() -> int:  # the command line, restarted each time
        return cli.main(["client", "--local-dir", str(root), "--client-id", "alice", "--data", str(data["alice"]),
                         "--output-dir", str(tmp_path / "out-alice"), "--round-timeout", "0.5", "--poll-interval", "0.05",
                         "--lr", "5e-3"])

    def bob():
        return run_client(store, "bob", data["bob"], output_dir=str(tmp_path / "out-bob"), personal_dir=str(tmp_path / "bob-own"),
                          learning_rate=5e-3, round_timeout=0.5, poll_interval=0.05)

    for rnd in range(2):
        for client in (alice, bob):
            with pytest.raises(TimeoutError, match=f"Round {rnd + 1} was not published"):
                client()
        assert aggregate_round(store, config, ["alice", "bob"]) == rnd + 1
    assert alice() == 0 and bob()["train_loss"] == 0.0  # nothing left to train: the final round, then they return

    state0, _ = store.read_round(0)
    keys = get_strategy(config).personal_keys(state0)
    assert any("classifier" in k for k in keys)
    folders = {"alice": tmp_path / "out-alice" / "personal" / "alice", "bob": tmp_path / "bob-own" / "bob"}
    for client, folder in folders.items():
        mine = {r: (start, end) for c, r, start, end in spy.rounds if c == client}
        assert sorted(mine) == [0, 1]
        assert_equal(personal_of(mine[1][0], keys), personal_of(mine[0][1], keys), f"{client} restarted: its saved part")
        assert snapshot_rounds(folder) == [1, 2]
        assert_equal(read_snapshot(folder, 2)[0], personal_of(mine[1][1], keys), f"{client}: its last part")
        assert read_snapshot(folder, 2)[1]["federation"] == str(root.resolve())  # the store it belongs to
    for path in (root / "updates").rglob("update.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert not any("lora_B" in k or "classifier" in k for k in f.keys()), path
    model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(model_dir), str(store.round_path(2))).eval()
    load_personal(model, folders["alice"])
    final, _ = store.read_round(2)
    got = {k: v for k, v in read_tensors(model).items() if k in final.tensors}
    assert_equal(personal_of(got, keys), read_snapshot(folders["alice"], 2)[0], "alice's part over plain PEFT")
    assert all(torch.equal(got[k], final.tensors[k]) for k in got if k not in keys)

"""Flower as the engine (peft_federated.flower): our strategies as a Flower Strategy, FederatedTrainer as
a ClientApp, in Flower's real simulation engine (Ray backend, 4 supernodes).

One simulation (the module fixture) runs every federation below in turn from one ServerApp, so Ray and
its actors start once: rolora, hetlora, fedex, flora, ffa, fedsa and fedit under DP with the same data, seeds and client
sampling as `run_simulation` (the contract; per-client ranks, single factors, base changes and personal tensors), then a federation in which client-3 replies with a different hostile
update each round. The codec of what travels in the messages is tested without Ray.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower reads it when first imported; tests stay offline

import numpy as np
import pytest
import torch
from datasets import Dataset
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from peft import PeftModel, get_peft_model
from tiny import token_dataset, tiny_args, tiny_bert, tiny_config

from peft_federated.flower import FederatedLoraStrategy, client_app, node_client_id
from peft_federated.flower.records import (
    CLIENT_ID_ACTION, config_from_json, config_to_json, from_arrays, read_config, read_round, round_content, to_arrays,
)
from peft_federated.hub_integration import LocalStore
from peft_federated import privacy
from peft_federated.personal import client_folder, read_snapshot, snapshot_rounds
from peft_federated.roles import federation_config
from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies import get_strategy
from peft_federated.trainer import FederatedTrainer, run_simulation

DATA = {f"client-{k}": token_dataset(24 + 4 * k, k, label_bias=k % 3) for k in range(4)}
CONTRACT = {
    "rolora": tiny_config("rolora", clients_per_round=3),
    "hetlora": tiny_config("hetlora", clients_per_round=3, client_ranks={"client-0": 2, "client-1": 3}),
    "fedex": tiny_config("fedex", clients_per_round=3),
    "flora": tiny_config("flora", clients_per_round=3, client_ranks={"client-0": 2, "client-2": 1}),
    "ffa": tiny_config("ffa", clients_per_round=3),
    "fedsa": tiny_config("fedsa", clients_per_round=3),  # each node keeps its own B and head between rounds
    # DP (server-side noise, seeded for the test): clients drawn with probability 1/2 each, as the accountant
    # assumes; seed 8 draws 2, 2 and 0 clients, so round 3 is the noise alone, published as run_simulation does
    "fedit_dp": tiny_config("fedit", clients_per_round=2, weighting="uniform", dp_clip_norm=0.5, dp_noise_multiplier=1.0,
                            dp_num_clients=4, dp_delta=1e-3, dp_seed=8),
}
HOSTILE = "client-3"
# One attack per round of the hostile federation, and the words its refusal must say.
ATTACKS = {
    "shape": "has shape",
    "nan": "NaN or Inf",
    "unknown key": "unexpected tensors",
    "huge norm": "above max_update_norm=10",
    "dtype": "has dtype torch.float64",
    "samples": "above max_num_samples",
    "pickle": "has dtype object, not a number type",
    "records": "must hold one ArrayRecord named 'arrays'",
    "stale round": "it was trained from round",
    "crash": "its ClientApp failed",
}
HOSTILE_CONFIG = tiny_config("rolora", num_rounds=len(ATTACKS), max_update_norm=10.0)
# Both paths train in one thread: the Ray actors get one CPU each (OMP_NUM_THREADS=1), and run_simulation
# runs with torch.set_num_threads(1). With the same seeds and the same accept order (sampled clients in
# sorted order; accept_files is bit for bit accept in turn), the adapters then come out bit-identical;
# the float32 tolerance only covers reassociation if a BLAS call were split across threads differently.
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


BUILDS = "PF_TEST_FLOWER_BUILDS"  # a file each model_fn call appends "<pid> <federation>" to
CLIENTS = "PF_TEST_FLOWER_CLIENTS"  # the folder of the nodes' output folders (personal tensors included)


def model_fn(config, context):
    if os.environ.get(BUILDS):
        with open(os.environ[BUILDS], "a") as f:
            f.write(f"{os.getpid()} {config.strategy}/{config.num_rounds}/{config.max_update_norm}\n")
    return tiny_bert(config)


def trainer_fn(model, config, context):
    client_id = node_client_id(context)
    args = tiny_args(Path(os.environ.get(CLIENTS, Path(tempfile.gettempdir()) / "peft-federated-test-flower")) / client_id)
    return FederatedTrainer(model=model, args=args, train_dataset=DATA[client_id], federated_config=config, client_id=client_id)


HONEST = client_app(model_fn, trainer_fn)
APP = ClientApp()  # honest, except client-3 where the server's train config says "hostile"


@APP.query(CLIENT_ID_ACTION)
def _client_id(msg, context):
    return HONEST(msg, context)


@APP.train()
def _train(msg, context):
    config = msg.content.config_records["config"]
    attack = list(ATTACKS)[int(config["server-round"]) - 1] if config.get("hostile") == node_client_id(context) else None
    if attack == "crash":
        raise RuntimeError("the hostile client crashed")
    reply = HONEST(msg, context)
    if attack is not None:
        attack_reply(reply.content, attack)
    return reply


def attack_reply(content, attack: str) -> None:
    tensors = from_arrays(content.array_records["arrays"])
    key = next(k for k in tensors if "lora" in k)
    if attack == "shape":
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]], 0)
    elif attack == "nan":
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")
    elif attack == "unknown key":
        tensors["base_model.model.bert.pooler.dense.lora_A.weight"] = torch.zeros(4, 16)
    elif attack == "huge norm":
        tensors = {k: v + 100.0 for k, v in tensors.items()}
    elif attack == "dtype":
        tensors[key] = tensors[key].double()
    elif attack == "samples":
        content.metric_records["metrics"]["num-examples"] = 10**12
    elif attack == "pickle":
        buffer = io.BytesIO()
        np.save(buffer, np.array([object()], dtype=object), allow_pickle=True)
        tensors = None
        content.array_records["arrays"][key] = Array(dtype="object", shape=(1,), stype="numpy.ndarray", data=buffer.getvalue())
    elif attack == "records":
        content["more-arrays"] = ArrayRecord()
    elif attack == "stale round":
        content.config_records["federation"]["round"] = 7
    if tensors is not None:
        content["arrays"] = to_arrays(tensors)


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    """Every federation of this module in one Flower simulation: {name: (strategy, Flower Result)}."""
    from flwr.simulation import run_simulation as flower_simulation

    root = tmp_path_factory.mktemp("flower")
    runs = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        for name, cfg in [*CONTRACT.items(), ("hostile", HOSTILE_CONFIG)]:
            strategy = FederatedLoraStrategy(cfg, store=root / name, min_available_nodes=4,
                                             clients=sorted(DATA) if cfg.dp else None)  # DP: N is in the accounting
            train_config = ConfigRecord({"hostile": HOSTILE}) if name == "hostile" else None
            runs[name] = strategy, strategy.start(grid, strategy.initial_arrays(tiny_bert(cfg)), train_config=train_config)

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # Flower rewrites it for its Ray workers; restored after
        mp.setenv(BUILDS, str(root / "builds.txt"))  # the Ray workers inherit it
        mp.setenv(CLIENTS, str(root / "clients"))
        try:
            flower_simulation(server, APP, num_supernodes=4, backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},  # 2 actors on this 2-core machine
                "init_args": {"num_cpus": 2, "num_gpus": 0}})
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()
    assert list(runs) == [*CONTRACT, "hostile"], "the ServerApp did not run every federation"
    return root, runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONTRACT))
def test_flower_simulation_gives_run_simulations_adapter(flower_run, name, tmp_path):
    root, runs = flower_run
    cfg = CONTRACT[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_simulation(tiny_bert(cfg), cfg, DATA, tiny_args(tmp_path), tmp_path / "ours", progress=False)
    finally:
        torch.set_num_threads(threads)
    ours, flower = LocalStore(tmp_path / "ours"), LocalStore(root / name)
    assert flower.latest_round() == ours.latest_round() == cfg.num_rounds
    for rnd in range(1, cfg.num_rounds + 1):
        (a, meta_a), (b, meta_b) = flower.read_round(rnd), ours.read_round(rnd)
        assert [c["client_id"] for c in meta_a["contributions"]] == [c["client_id"] for c in meta_b["contributions"]]
        assert meta_a["refused"] == [] and meta_a.get("dp") == meta_b.get("dp")
        assert len(meta_a["contributions"]) == (0 if cfg.dp else 3)  # under DP who took part is not published
        assert a.strategy_state == b.strategy_state and a.tensors.keys() == b.tensors.keys()
        for key in b.tensors:
            torch.testing.assert_close(a.tensors[key], b.tensors[key], **TOLERANCE)
        assert a.base_delta.keys() == b.base_delta.keys()
        for module in b.base_delta:
            torch.testing.assert_close(a.base_delta[module].dense(), b.base_delta[module].dense(), **TOLERANCE)
    if name == "hetlora":  # the clients' own ranks travelled, and pruned
        assert a.strategy_state["client_ranks"]["client-0"] < 2
    if name in ("fedex", "flora"):
        assert a.base_delta, f"{name}'s rounds carry a base change"
    if name == "fedsa":  # each node kept the same personal B and head as run_simulation's client, on its side only
        for client_id in DATA:
            mine = client_folder(root / "clients" / client_id / "trainer" / "personal", client_id)
            theirs = client_folder(tmp_path / "trainer" / "personal", client_id)
            assert snapshot_rounds(mine) == snapshot_rounds(theirs) != []
            (x, _), (y, _) = (read_snapshot(f, snapshot_rounds(f)[-1]) for f in (mine, theirs))
            assert x.keys() == y.keys() and any("lora_B" in k for k in x)
            for key in y:
                torch.testing.assert_close(x[key], y[key], **TOLERANCE)
    strategy, result = runs[name]
    assert strategy.state.round == cfg.num_rounds and len(strategy.history) == cfg.num_rounds
    sampled = [len(privacy.poisson_sample(cfg, sorted(DATA), r)) if cfg.dp else 3 for r in range(cfg.num_rounds)]
    assert [result.train_metrics_clientapp[r]["accepted"] for r in range(1, cfg.num_rounds + 1)] == sampled
    assert not cfg.dp or 0 in sampled  # a DP round that drew no client is published all the same
    if cfg.dp:
        assert a.tensors and meta_a["dp"]["epsilon"] == pytest.approx(privacy.PrivacyPlan.of(cfg).epsilon(cfg.num_rounds))


@pytest.mark.slow
def test_one_base_model_per_clientapp_process(flower_run):
    """A ClientApp process builds the base model once per federation, not once per round or node: each Ray
    actor serves several supernodes over every round of a federation with one model."""
    root, runs = flower_run
    builds = [tuple(line.split()) for line in (root / "builds.txt").read_text().splitlines()]
    trainings = sum(len(c["contributions"]) + len(c.get("refused", [])) for _, (strategy, _) in runs.items() for c in strategy.history)
    assert len(builds) == len(set(builds)), builds  # never twice for one federation in one process
    assert len({pid for pid, _ in builds}) <= 2 and len(builds) <= 2 * len(runs) < trainings  # 2 actors on 2 CPUs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONTRACT))
def test_published_rounds_load_with_plain_peft(flower_run, name):
    """Each round the ServerApp published is a PEFT adapter folder: loaded onto the base model, it computes
    the federation's global model of that round (base change included)."""
    root, runs = flower_run
    cfg, store = CONTRACT[name], LocalStore(root / name)
    ids = torch.tensor(DATA["client-0"]["input_ids"][:6])
    for rnd in range(cfg.num_rounds + 1):
        loaded = PeftModel.from_pretrained(tiny_bert(cfg).unload(), str(store.round_path(rnd))).eval()
        model = tiny_bert(cfg).eval()
        get_strategy(cfg).prepare_client(model, store.read_round(rnd)[0], "global").close()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
    assert (store.round_path(cfg.num_rounds) / "README.md").is_file()  # the model card, as the store aggregator writes it


@pytest.mark.slow
def test_hostile_replies_are_refused_with_their_reason_and_leave_no_trace(flower_run, tmp_path):
    """Each round client-3 replies with another hostile update (or crashes): it is refused with a reason that
    names what is wrong, the round goes on with the three others, and its result is exactly the aggregate of
    those three (recomputed here from the previous round with the same trainers)."""
    root, runs = flower_run
    strategy, result = runs["hostile"]
    store, cfg = LocalStore(root / "hostile"), HOSTILE_CONFIG
    assert store.latest_round() == len(ATTACKS)
    honest = sorted(set(DATA) - {HOSTILE})
    trainer = FederatedTrainer(model=tiny_bert(cfg), args=tiny_args(tmp_path), train_dataset=DATA[honest[0]], federated_config=cfg)
    for rnd, (attack, words) in enumerate(ATTACKS.items(), start=1):
        state, meta = store.read_round(rnd)
        assert [r["client_id"] for r in meta["refused"]] == [HOSTILE], attack
        assert words in meta["refused"][0]["reason"], (attack, meta["refused"][0]["reason"])
        assert [c["client_id"] for c in meta["contributions"]] == honest
        metrics = result.train_metrics_clientapp[rnd]
        assert (metrics["round"], metrics["accepted"], metrics["refused"], metrics["missing"]) == (rnd, 3, 1, 0)
        assert strategy.history[rnd - 1]["refused"] == meta["refused"]
        previous = store.read_round(rnd - 1)[0]
        updates = []
        for client_id in honest:
            trainer.client_id, trainer.train_dataset = client_id, DATA[client_id]
            payload, num_samples, _ = trainer.train_round(previous)
            updates.append((client_id, payload, num_samples))
        expected = get_strategy(cfg).aggregate(previous, updates)
        for key in expected.tensors:
            torch.testing.assert_close(state.tensors[key], expected.tensors[key], **TOLERANCE)


# ---- what travels in the messages, without Ray -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool])
def test_arrays_carry_tensors_exactly(dtype, gen):
    tensors = {"a": (torch.randn(3, 5, generator=gen) * 4).to(dtype), "empty": torch.zeros(0, 7, dtype=dtype),
               "scalar": torch.tensor(1, dtype=dtype)}
    back = from_arrays(to_arrays(tensors))
    assert list(back) == list(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == dtype and back[key].shape == value.shape and torch.equal(back[key], value)


def _array(data: bytes, dtype="float32", shape=(2,), stype="numpy.ndarray") -> ArrayRecord:
    return ArrayRecord({"x": Array(dtype=dtype, shape=shape, stype=stype, data=data)})


def _header(shape: tuple, descr: str = "<f4") -> bytes:
    """A .npy header alone, claiming `shape`."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _npy(value: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=value.dtype == object)
    return buffer.getvalue()


@pytest.mark.parametrize("record, words", [
    (_array(_npy(np.array([{"code": 1}], dtype=object)), "object"), "has dtype object, not a number type"),
    (_array(pickle.dumps(np.zeros(2))), "is not a numpy array's bytes"),
    (_array(_npy(np.zeros(4, dtype=np.float32))[:-3]), "holds 13 bytes of values, not the 16 of its header's shape (4,)"),
    (_array(_header((10**13,)) + b"\0" * 16), "holds 16 bytes of values, not the 40000000000000 of its header's shape"),
    (_array(_npy(np.zeros(1, dtype=[("a", "<f4"), ("b", "<i4")]))), "not a number type a tensor holds"),
    (_array(b"\x93NUMPY\x01\x00garbage"), "is not a numpy array's bytes"),
    (_array(_npy(np.array(["a", "b"]))), "not a number type a tensor holds"),
    (_array(_npy(np.zeros(2, dtype=np.complex64))), "not a number type a tensor holds"),
    (_array(b"\0" * 5, "bfloat16", (3,), "torch.raw"), "holds 5 bytes, not the 6"),
    (_array(b"\0" * 4, "float32", (1,), "torch.raw"), "raw bytes are only for bfloat16"),
    (_array(b"\0" * 4, "bfloat16", (-1, -2), "torch.raw"), "not a tuple of sizes"),
    (_array(b"\0" * 4, "float32", (1,), "pickle"), "has serialization 'pickle'"),
])
def test_undecodable_arrays_are_refused_with_the_reason(record, words):
    with pytest.raises(ValueError, match="array 'x' ") as err:
        from_arrays(record)
    assert words in str(err.value)


@pytest.mark.parametrize("layout", ["big-endian", "fortran-order"])
def test_any_npy_layout_is_read_as_its_values(layout):
    value = np.arange(6, dtype=">f4" if layout == "big-endian" else "<f4").reshape(2, 3)
    back = from_arrays(_array(_npy(np.asfortranarray(value) if layout == "fortran-order" else value)))["x"]
    assert back.dtype == torch.float32 and torch.equal(back, torch.arange(6.0).reshape(2, 3))


def test_round_message_carries_state_and_config(gen):
    cfg = tiny_config("hetlora", client_ranks={"client-0": 2}, max_update_norm=3.5)
    model = tiny_bert(cfg)
    state = get_strategy(cfg).initial_state(model)
    module = state.modules()[0]
    state = GlobalState(4, state.tensors, {module: LowRank(torch.randn(16, 2, generator=gen), torch.randn(2, 16, generator=gen))},
                        {"client_ranks": {"client-0": 1}})
    back, config = read_round(round_content(state, cfg))
    assert config_to_json(config) == config_to_json(cfg) and config.client_ranks == {"client-0": 2}
    assert config.max_update_norm == 3.5 and sorted(config.target_modules) == sorted(cfg.target_modules)
    assert back.round == 4 and back.strategy_state == {"client_ranks": {"client-0": 1}}
    assert all(torch.equal(back.tensors[k], v) for k, v in state.tensors.items()) and back.tensors.keys() == state.tensors.keys()
    assert torch.equal(back.base_delta[module].dense(), state.base_delta[module].dense())
    assert config_from_json(config_to_json(cfg)).to_lora_config().to_dict() == cfg.to_lora_config().to_dict()
    with pytest.raises(ValueError, match="not sent by peft_federated.flower's strategy"):
        read_config(RecordDict({}))


def test_strategy_by_name_and_refusals_of_its_arguments(tmp_path):
    strategy = FederatedLoraStrategy("fedex", r=4, lora_alpha=8, target_modules=["query"], store=tmp_path / "s")
    assert strategy.config.strategy == "fedex" and isinstance(strategy.store, LocalStore)
    with pytest.raises(TypeError, match="not both"):
        FederatedLoraStrategy(CONTRACT["fedex"], r=8)
    with pytest.raises(ValueError, match="pass initial_arrays\\(model\\)"):
        strategy.initial_arrays()
    cfg = CONTRACT["rolora"]
    arrays = FederatedLoraStrategy(cfg, store=tmp_path / "t").initial_arrays(tiny_bert(cfg))
    assert set(arrays) == set(LocalStore(tmp_path / "t").read_round(0)[0].tensors)
    assert FederatedLoraStrategy(cfg, store=tmp_path / "t").initial_arrays().keys() == arrays.keys()  # resumes round 0
    with pytest.raises(ValueError, match="Invalid client id"):
        FederatedLoraStrategy(cfg, clients=["../etc"])


def _delivered(content, node: int, message_type: str):
    """A message as a SuperNode hands it to its ClientApp (metadata set by the runtime)."""
    from flwr.app import Message, Metadata

    return Message(content, metadata=Metadata(run_id=1, message_id=f"m-{node}-{time.monotonic_ns()}", src_node_id=0, dst_node_id=node,
                                              reply_to_message_id="", group_id="1", created_at=time.time(), ttl=600,
                                              message_type=message_type))


def test_clientapp_trains_rounds_with_a_trl_trainer_on_one_model(tmp_path):
    """`client_app` with TRL's SFTTrainer (FederatedSFTTrainer), called as a SuperNode calls it: two nodes,
    two rounds, one model built for both; each node answers its client id and replies with exactly the
    payload its trainer's own `train_round` gives from the same state."""
    from flwr.app import Context
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from trl import SFTConfig

    from peft_federated import FederatedLoraConfig
    from peft_federated.demo import minilm_path
    from peft_federated.flower import QUERY_CLIENT_ID, client
    from peft_federated.flower.records import read_reply
    from peft_federated.trainer.trl import FederatedSFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = tokenizer.sep_token
    cfg = FederatedLoraConfig(strategy="fedex", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                              task_type="CAUSAL_LM", num_rounds=2, local_steps=2)
    texts = {k: Dataset.from_dict({"text": [f"client {k} sentence {i} says hello" for i in range(8 + 4 * k)]}) for k in range(2)}
    built = []

    def lm(config, context=None):
        built.append(context.node_id if context is not None else None)
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64))
        return get_peft_model(model, config.to_lora_config())

    def sft(model, config, context):
        k = int(context.node_config["partition-id"])
        args = SFTConfig(output_dir=str(tmp_path / f"sft-{k}"), per_device_train_batch_size=4, max_length=32, learning_rate=1e-2,
                         report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
        return FederatedSFTTrainer(model=model, args=args, train_dataset=texts[k], processing_class=tokenizer, federated_config=config,
                                   client_id=node_client_id(context))

    app = client_app(lm, sft)
    contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": node - 1, "num-partitions": 2}, state=RecordDict(),
                              run_config={}) for node in (1, 2)}
    try:
        query = RecordDict({"federation": ConfigRecord({"config": config_to_json(cfg)})})
        ids = {node: app(_delivered(query, node, QUERY_CLIENT_ID), ctx).content.config_records["federation"]["client-id"]
               for node, ctx in contexts.items()}
        assert ids == {1: "client-0", 2: "client-1"}
        strategy = get_strategy(cfg)
        state = strategy.initial_state(lm(cfg))
        for _ in range(cfg.num_rounds):
            updates = []
            for node, ctx in contexts.items():
                reply = app(_delivered(round_content(state, cfg), node, "train"), ctx)
                payload, fields = read_reply(reply.content)
                reference = sft(lm(cfg), cfg, ctx)
                expected, num_samples, _ = reference.train_round(state)
                assert fields["base_round"] == state.round and fields["num_samples"] == num_samples == len(texts[node - 1])
                assert payload.keys() == expected.keys()
                for key in expected:
                    torch.testing.assert_close(payload[key], expected[key], rtol=0, atol=0)
                updates.append((ids[node], payload, num_samples))
            state = strategy.aggregate(state, updates)
        assert built.count(1) + built.count(2) == 1, built  # the ClientApp's one model, for both nodes and both rounds
    finally:
        client._MODEL.clear()
        client._TRAINERS.clear()


# ---- the example app, run with `flwr run` -----------------------------------------------------------------
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_example_app_runs_with_flwr_run(tmp_path):
    """examples/flower as its README runs it, at tiny size: `flwr run` against a local SuperLink in simulation
    mode, 3 supernodes with client resources (one CPU each), a tiny random BERT with MiniLM's tokenizer on the
    tweets. Every round is published as a plain PEFT adapter and scored on the held-out tweets."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from peft_federated.demo import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    tiny = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=24, max_position_embeddings=32, num_labels=3)
    BertForSequenceClassification(tiny).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    home, port = tmp_path / "flwr-home", _free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    log = open(tmp_path / "superlink.log", "w")
    superlink = subprocess.Popen([str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port),
                                  "--disable-runtime-dependency-installation"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    out = tmp_path / "out"
    try:
        _wait_healthy(port, superlink)
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(EXAMPLE), "--stream",
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1 client-resources-num-gpus=0.0 init-args-num-cpus=2",
             "--run-config", f"model='{tmp_path / 'model'}' store-dir='{out}' num-server-rounds=2 clients-per-round=2 "
             "min-available-nodes=3 local-steps=2 batch-size=4 train-examples=60 eval-examples=20 max-length=16 probe-examples=12"],
            env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.killpg(superlink.pid, signal.SIGTERM)  # the SuperLink and the simulation it started
        superlink.wait(60)
        log.close()
    assert run.returncode == 0 and "after 2 rounds accuracy" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert [r["round"] for r in results["rounds"]] == [0, 1, 2] and results["config"]["strategy"] == "rolora"
    assert all(0 <= r["metrics"]["eval_accuracy"] <= 1 for r in results["rounds"]) and (out / "metrics.png").stat().st_size > 0
    store = LocalStore(out / "store")
    state, meta = store.read_round(2)
    assert len(meta["contributions"]) == 2 and meta["refused"] == []
    first = store.read_round(0)[0]  # the head the ServerApp fitted as a probe stays frozen in every ClientApp
    assert state.extra_keys() and all(torch.equal(first.tensors[k], state.tensors[k]) for k in state.extra_keys())
    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(tmp_path / "model"), str(store.round_path(2))).eval()
    cfg = federation_config(store)  # the federation's config, as a store client reads it from round 0
    model = get_peft_model(BertForSequenceClassification.from_pretrained(tmp_path / "model"), cfg.to_lora_config())
    get_strategy(cfg).prepare_client(model, state, "global").close()
    ids = torch.tensor([tokenizer("what a lovely day")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def _wait_healthy(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "flower-superlink exited"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"flower-superlink did not answer on port {port} within {timeout:.0f}s")

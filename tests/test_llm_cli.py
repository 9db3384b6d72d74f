"""A language-model federation from the command line: `peft-federated aggregate --task-type CAUSAL_LM`
and `peft-federated client` as real processes, through the loopback Hub server and through a local
folder, on a tiny random Llama; each client's data in another SFT format and file type. Every
published round loads with plain PEFT and gives the federation's model. Clients whose data cannot
train, or whose machine lacks the asked-for precision, are refused before any round trains and
submit nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import isolate_hub_client
from huggingface_hub import snapshot_download
from peft import PeftModel, get_peft_model
from test_sft_data import ROWS, lm_config, save_tiny_llama
from transformers import AutoModelForCausalLM

from peft_federated import get_strategy
from peft_federated.aggregator import initialize
from peft_federated.data.sft import SFTDataError
from peft_federated.hub_integration.hub_store import HubStore
from peft_federated.hub_integration.store import LocalStore
from peft_federated.roles import PrecisionError, federation_config, run_client
from peft_federated.testing import hub_server

REPO = "org/llm-federation"
ROUNDS = 2
CLI = [sys.executable, "-m", "peft_federated.cli"]
AGGREGATE = ["aggregate", "--task-type", "CAUSAL_LM", "--rounds", str(ROUNDS), "--rank", "2", "--lora-alpha", "4",
             "--local-steps", "2", "--target-modules", "q_proj,v_proj,down_proj", "--deadline", "120"]
CLIENT = ["client", "--batch-size", "4", "--lr", "1e-2", "--max-length", "48", "--round-timeout", "120"]


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    isolate_hub_client(monkeypatch, tmp_path, disable_xet=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def env_for(name: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(tmp_path / f"hf-{name}"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore", **extra}


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(CLI + args, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def wait_all(procs: dict[str, subprocess.Popen], tmp_path: Path, budget: float) -> str:
    """Wait for every process to exit 0 within `budget` seconds; the aggregator's log."""
    started = time.monotonic()
    for name, proc in procs.items():
        try:
            rc = proc.wait(timeout=max(1.0, budget - (time.monotonic() - started)))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        assert rc == 0, f"{name} exited with {rc}:\n{(tmp_path / f'{name}.log').read_text()[-4000:]}"
    return (tmp_path / "aggregator.log").read_text()


def check_summary(log: str, clients: list[str]) -> None:
    summary = json.loads(log[log.rindex('{\n  "store"'):])
    assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS + 1))
    assert all(r["clients"] == sorted(clients) for r in summary["rounds"][1:])


def check_plain_peft_loads(folder: Path, llama_dir: Path, store, round: int) -> None:
    """`PeftModel.from_pretrained(base, folder)` gives the logits of the federation's global model of
    `round` (built here from the round's state), which differ from the base model's."""
    cfg = federation_config(store)
    state, _ = store.read_round(round)
    ids = torch.randint(1000, 2000, (3, 10), generator=torch.Generator().manual_seed(round))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(folder)).eval()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), cfg.to_lora_config())
    get_strategy(cfg).prepare_client(model, state, "global").close()
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
        torch.testing.assert_close(logits, model.eval()(input_ids=ids).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(logits, base(input_ids=ids).logits, atol=1e-5)  # the rounds did change the model


@pytest.mark.slow  # an aggregator and two clients as processes
def test_causal_lm_federation_through_the_hub(llama_dir, tmp_path):
    """FedEx-LoRA (an exact strategy: its base change travels as extra ranks); alice trains on plain
    text in a JSON-lines file, bob on chat messages in a `save_to_disk` folder with gradient accumulation and checkpointing."""
    (tmp_path / "alice.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ROWS["text"]["text"]))
    Dataset.from_dict(ROWS["messages"]).save_to_disk(str(tmp_path / "bob-data"))
    tokens = {"tok-aggregator": "aggregator", "tok-alice": "alice", "tok-bob": "bob"}
    server = subprocess.Popen([sys.executable, hub_server.__file__, "--root", str(tmp_path / "hub"), "--lfs-mode", "lfs",
                               *[f"--token={t}={u}" for t, u in tokens.items()], "--permission", "aggregator=org/*",
                               *[f"--permission={c}={REPO}-updates-{c}" for c in ("alice", "bob")]],
                              stdout=subprocess.PIPE, text=True)
    procs: dict[str, subprocess.Popen] = {}
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        where = ["--repo", REPO, "--poll-interval", "0.2"]
        procs["aggregator"] = start(AGGREGATE + where + ["--clients", "alice,bob", "--model", str(llama_dir), "--strategy", "fedex"],
                                    env_for("aggregator", tmp_path, HF_ENDPOINT=url, HF_TOKEN="tok-aggregator"),
                                    tmp_path / "aggregator.log")
        data = {"alice": [str(tmp_path / "alice.jsonl")], "bob": [str(tmp_path / "bob-data"), "--gradient-accumulation-steps", "2", "--gradient-checkpointing"]}
        for client, extra in data.items():
            procs[client] = start(CLIENT + where + ["--client-id", client, "--output-dir", str(tmp_path / f"out-{client}"),
                                                    "--data", *extra],
                                  env_for(client, tmp_path, HF_ENDPOINT=url, HF_TOKEN=f"tok-{client}"), tmp_path / f"{client}.log")
        check_summary(wait_all(procs, tmp_path, budget=240), ["alice", "bob"])
        reader = HubStore(REPO, endpoint=url, cache_dir=tmp_path / "verify-cache")
        for round in range(1, ROUNDS + 1):
            folder = snapshot_download(REPO, revision=f"round-{round:04d}", endpoint=url, cache_dir=tmp_path / "peft-user")
            check_plain_peft_loads(Path(folder), llama_dir, reader, round)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        server.terminate()
        server.wait(10)


@pytest.mark.slow  # an aggregator and two clients as processes
def test_causal_lm_federation_in_a_local_folder(llama_dir, tmp_path):
    """RoLoRA over --local-dir; carol's prompt/completion CSV has its own column names (--prompt-column,
    --completion-column), dave's plain text is packed (--packing)."""
    pc = ROWS["prompt_completion"]
    (tmp_path / "carol.csv").write_text("question,answer\n" + "".join(f"{p},{c}\n" for p, c in zip(pc["prompt"], pc["completion"])))
    (tmp_path / "dave.json").write_text(json.dumps([{"text": t} for t in ROWS["text"]["text"] * 3]))
    where = ["--local-dir", str(tmp_path / "store"), "--poll-interval", "0.2"]
    procs = {"aggregator": start(AGGREGATE + where + ["--clients", "carol,dave", "--model", str(llama_dir), "--strategy", "rolora"],
                                 env_for("aggregator", tmp_path), tmp_path / "aggregator.log")}
    data = {"carol": [str(tmp_path / "carol.csv"), "--prompt-column", "question", "--completion-column", "answer"],
            "dave": [str(tmp_path / "dave.json"), "--packing", "--max-length", "16"]}
    try:
        for client, extra in data.items():
            procs[client] = start(CLIENT + where + ["--client-id", client, "--output-dir", str(tmp_path / f"out-{client}"),
                                                    "--data", *extra], env_for(client, tmp_path), tmp_path / f"{client}.log")
        check_summary(wait_all(procs, tmp_path, budget=240), ["carol", "dave"])
        for client in data:
            log = (tmp_path / f"{client}.log").read_text()
            printed = json.loads(log[log.rindex('{\n  "client_id"'):])
            assert printed["client_id"] == client and printed["metrics"]["train_loss"] > 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    store = LocalStore(tmp_path / "store")
    for round in range(1, ROUNDS + 1):
        check_plain_peft_loads(store.round_folder(round), llama_dir, store, round)


def published_round_0(llama_dir: Path, root: Path) -> LocalStore:
    store = LocalStore(root)
    cfg = lm_config(strategy="fedit", base_model_name_or_path=str(llama_dir))
    initialize(store, cfg, get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), cfg.to_lora_config()))
    return store


def test_the_client_command_refuses_data_without_its_columns_before_training(llama_dir, tmp_path):
    store = published_round_0(llama_dir, tmp_path / "store")
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in ROWS["text"]["text"]))
    proc = subprocess.run(CLI + CLIENT + ["--local-dir", str(store.root), "--client-id", "erin", "--data", str(tmp_path / "bad.jsonl")],
                          env=env_for("erin", tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "peft-federated client: error:" in proc.stderr and "--text-column" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert store.list_updates(0) == []


@pytest.mark.parametrize("case", ["no-columns", "empty", "prompts-fill-max-length", "no-chat-template", "blank-text"])
def test_untrainable_data_is_refused_before_any_round_trains(case, llama_dir, tmp_path):
    store = published_round_0(llama_dir if case != "no-chat-template" else save_tiny_llama(tmp_path / "plain", chat_template=False),
                              tmp_path / "store")
    rows, kw, message = {
        "no-columns": ([{"question": "a", "answer": "b"}], {}, r"none of the columns .*--prompt-column"),
        "empty": ([], {}, "has no rows"),
        "prompts-fill-max-length": ([{"prompt": p, "completion": c} for p, c in zip(*ROWS["prompt_completion"].values())],
                                    {"max_length": 3}, r"every prompt fills it .*Raise --max-length"),
        "no-chat-template": ([{"messages": m} for m in ROWS["messages"]["messages"]], {}, "no chat template"),
        "blank-text": ([{"text": "fine"}, {"text": ""}], {}, "row 1 has no 'text'"),
    }[case]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SFTDataError, match=message):
        run_client(store, "erin", path, output_dir=str(tmp_path / "out"), round_timeout=5, poll_interval=0.1, **kw)
    assert store.list_updates(0) == []  # nothing submitted, not even an empty update
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.safetensors"))


def test_precision_the_machine_lacks_is_refused_before_waiting_for_round_0(tmp_path):
    empty = LocalStore(tmp_path / "empty")  # no round 0: a client that got past the check would wait, then time out
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    with pytest.raises(PrecisionError, match="one of --bf16 and --fp16"):
        run_client(empty, "erin", tmp_path / "data.jsonl", bf16=True, fp16=True, round_timeout=0)
    if torch.cuda.is_available():
        with pytest.raises(TimeoutError):  # a CUDA GPU has float16: the client goes on to wait for round 0
            run_client(empty, "erin", tmp_path / "data.jsonl", fp16=True, round_timeout=0)
    else:
        with pytest.raises(PrecisionError, match="--fp16 needs a CUDA GPU"):
            run_client(empty, "erin", tmp_path / "data.jsonl", fp16=True, round_timeout=0)
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(SFTDataError, match="has no rows"):  # an empty file, before waiting for round 0 either
        run_client(empty, "erin", tmp_path / "none.jsonl", round_timeout=0)


def test_a_chat_template_file_lets_messages_train_with_a_tokenizer_without_one(tmp_path):
    from test_sft_data import CHAT_TEMPLATE

    store = published_round_0(save_tiny_llama(tmp_path / "plain", chat_template=False), tmp_path / "store")
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in ROWS["messages"]["messages"]))
    with pytest.raises(FileNotFoundError):  # a missing template file: refused before anything else
        run_client(LocalStore(tmp_path / "empty"), "erin", path, chat_template=str(tmp_path / "missing.jinja"), round_timeout=0)
    (tmp_path / "chat.jinja").write_text(CHAT_TEMPLATE)
    with pytest.raises(TimeoutError):  # round 0 trained and submitted; nobody aggregates it here
        run_client(store, "erin", path, chat_template=str(tmp_path / "chat.jinja"), output_dir=str(tmp_path / "out"),
                   batch_size=4, round_timeout=3, poll_interval=0.1)
    assert store.list_updates(0) == ["erin"]

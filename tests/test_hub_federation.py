"""A real federation through a Hub: the Hub server, one aggregator and three clients, each its own
process started from the command line, then every round checked from what the Hub alone holds.

- the server: `hub_server.py --lfs-mode lfs` (clients upload safetensors with git-LFS, xet off);
- the aggregator: `peft-federated aggregate` with its own token, FedEx-LoRA (an exact strategy);
- three clients, each with its own token, data (a `save_to_disk` folder, a JSON file, a CSV file)
  and updates repo (two in their own namespace, one at the default name in the organisation).
Then: each round's tag exists; each published round equals FedEx's aggregation of that round's
updates, recomputed here from the update files downloaded from the Hub; and plain PEFT, in a process
with HF_ENDPOINT pointed at the server, loads round 2 by its tag with the federation's logits.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import isolate_hub_client
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file
from tiny import LABELS, SEQ, VOCAB, token_dataset
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from peft_federated import get_strategy
from peft_federated.hub_integration.hub_store import HubStore
from peft_federated.roles import federation_config
from peft_federated.testing import hub_server

REPO = "org/federation"
TOKENS = {"tok-aggregator": "aggregator", "tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol"}
UPDATE_REPOS = {"alice": "alice/federation-updates", "bob": "bob/federation-updates", "carol": f"{REPO}-updates-carol"}
ROUNDS = 3
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(len(SPECIALS), VOCAB)]  # the vocabulary is exactly VOCAB tokens


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    isolate_hub_client(monkeypatch, tmp_path, disable_xet=True)


def save_base_model(folder: Path) -> Path:
    """A tiny random BERT classifier and a word-level tokenizer over its VOCAB tokens."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        num_labels=LABELS, max_position_embeddings=SEQ + 2))
    model.save_pretrained(folder)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    return folder


def text_rows(n: int, seed: int, skew: int) -> list[dict]:
    """Sentences of SEQ - 2 words; the label is the third of the vocabulary the first word falls in."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        ids = rng.integers(0, len(WORDS), SEQ - 2)
        if rng.random() < 0.6:  # label skew: this client sees mostly one class
            ids[0] = rng.integers(skew * len(WORDS) // 3, (skew + 1) * len(WORDS) // 3)
        rows.append({"text": " ".join(WORDS[i] for i in ids), "label": int(ids[0] * 3 // len(WORDS))})
    return rows


def write_client_data(tmp_path: Path) -> dict[str, Path]:
    data = {"alice": tmp_path / "alice-data", "bob": tmp_path / "bob.json", "carol": tmp_path / "carol.csv"}
    token_dataset(40, seed=1, label_bias=0).rename_column("labels", "label").save_to_disk(str(data["alice"]))
    data["bob"].write_text("\n".join(json.dumps(r) for r in text_rows(32, seed=2, skew=1)))
    data["carol"].write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in text_rows(24, seed=3, skew=2)))
    return data


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def test_aggregator_and_three_clients_as_processes_through_the_hub(tmp_path):
    started = time.monotonic()
    model_dir = save_base_model(tmp_path / "base-model")
    data = write_client_data(tmp_path)
    server = subprocess.Popen(
        [sys.executable, hub_server.__file__, "--root", str(tmp_path / "hub"), "--lfs-mode", "lfs",
         *[f"--token={t}={u}" for t, u in TOKENS.items()],
         "--permission", "aggregator=org/*", "--permission", f"carol={UPDATE_REPOS['carol']}"],
        stdout=subprocess.PIPE, text=True)
    procs: dict[str, subprocess.Popen] = {}
    try:
        url = server.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), url
        base_env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_DISABLE_XET": "1", "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
        cli = [sys.executable, "-m", "peft_federated.cli"]
        common = ["--repo", REPO, "--poll-interval", "0.2"]
        procs["aggregator"] = start(cli + ["aggregate", *common, "--token", "tok-aggregator",
                                           "--clients", ",".join(UPDATE_REPOS),
                                           "--client-repo", f"alice={UPDATE_REPOS['alice']}",
                                           "--client-repo", f"bob={UPDATE_REPOS['bob']}",
                                           "--model", str(model_dir), "--strategy", "fedex", "--rounds", str(ROUNDS),
                                           "--rank", "4", "--lora-alpha", "8", "--local-steps", "3", "--deadline", "120",
                                           "--target-modules", "query,value,intermediate.dense"],
                                    {**base_env, "HF_HOME": str(tmp_path / "hf-aggregator")}, tmp_path / "aggregator.log")
        for client in UPDATE_REPOS:
            args = ["client", *common, "--client-id", client, "--data", str(data[client]), "--max-length", str(SEQ + 2),
                    "--batch-size", "8", "--lr", "5e-3", "--round-timeout", "120", "--output-dir", str(tmp_path / f"out-{client}")]
            if client != "carol":  # carol takes the default: the updates repo at <repo>-updates-carol, the model the federation names
                args += ["--update-repo", UPDATE_REPOS[client], "--model", str(model_dir)]
            env = {**base_env, "HF_HOME": str(tmp_path / f"hf-{client}"), "HF_TOKEN": f"tok-{client}"}
            procs[client] = start(cli + args, env, tmp_path / f"{client}.log")
        for name, proc in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, 170 - (time.monotonic() - started)))
            except subprocess.TimeoutExpired:
                rc = "timeout"
            log = (tmp_path / f"{name}.log").read_text()
            assert rc == 0, f"{name} exited with {rc}:\n{log[-4000:]}"
        log = (tmp_path / "aggregator.log").read_text()
        summary = json.loads(log[log.rindex('{\n  "store"'):])
        assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS + 1))
        assert all(r["clients"] == sorted(UPDATE_REPOS) for r in summary["rounds"][1:])

        check_rounds_from_the_hub(url, tmp_path)
        check_plain_peft_loads_round_2(url, tmp_path, model_dir, base_env)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        server.terminate()
        server.wait(10)
    print(f"hub federation test: {time.monotonic() - started:.1f}s")


def check_rounds_from_the_hub(url: str, tmp_path: Path) -> None:
    """Every round tag exists, and each round is FedEx's aggregation of the updates the Hub holds for the round before."""
    api = HfApi(endpoint=url)
    refs = api.list_repo_refs(REPO)
    tags = {t.name: t.target_commit for t in refs.tags}
    assert sorted(tags) == [f"round-{r:04d}" for r in range(ROUNDS + 1)]
    assert {b.name: b.target_commit for b in refs.branches} == {"main": tags[f"round-{ROUNDS:04d}"]}
    cache = tmp_path / "verify-cache"
    reader = HubStore(REPO, endpoint=url, cache_dir=cache)  # anonymous: reading needs no token
    cfg = federation_config(reader)
    assert cfg.strategy == "fedex" and cfg.r == 4 and cfg.num_rounds == ROUNDS
    strategy = get_strategy(cfg)
    for rnd in range(ROUNDS):
        state, _ = reader.read_round(rnd)
        updates, shas = [], {}
        for client, repo in sorted(UPDATE_REPOS.items()):
            meta = json.loads(Path(hf_hub_download(repo, f"round-{rnd:04d}/update.json", endpoint=url, cache_dir=cache)).read_text())
            path = hf_hub_download(repo, f"round-{rnd:04d}/update.safetensors", endpoint=url, cache_dir=cache)
            shas[client] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            assert meta["sha256"] == shas[client] and meta["base_round"] == rnd
            assert meta["base_commit"] == tags[f"round-{rnd:04d}"]
            updates.append((client, load_file(path), meta["num_samples"]))
        expected = strategy.aggregate(state, updates)
        published, meta = reader.read_round(rnd + 1)
        assert {c["client_id"]: c["sha256"] for c in meta["contributions"]} == shas
        assert published.tensors.keys() == expected.tensors.keys()
        for key, value in expected.tensors.items():
            torch.testing.assert_close(published.tensors[key], value, rtol=1e-6, atol=1e-7)
        assert published.base_delta.keys() == expected.base_delta.keys() == set(state.modules())
        for module, delta in expected.base_delta.items():  # FedEx's residual, folded into the base
            torch.testing.assert_close(published.base_delta[module].dense(), delta.dense(), rtol=1e-5, atol=1e-7)
        assert any(float(delta.dense().abs().max()) > 1e-4 for delta in expected.base_delta.values())
        assert all(not torch.equal(published.tensors[k], state.tensors[k]) for k in state.tensors if "lora_B" in k)


PEFT_LOAD = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification
model = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(sys.argv[1]), sys.argv[2], revision=sys.argv[3])
inputs = torch.load(sys.argv[4])
with torch.no_grad():
    torch.save(model.eval()(**inputs).logits, sys.argv[5])
"""


def check_plain_peft_loads_round_2(url: str, tmp_path: Path, model_dir: Path, base_env: dict[str, str]) -> None:
    """`PeftModel.from_pretrained(base, repo, revision="round-0002")` in a process with HF_ENDPOINT set
    gives the logits of the federation's global model of round 2 (built here from the round's state)."""
    from peft import get_peft_model

    ids = torch.tensor(token_dataset(16, seed=9)["input_ids"])
    torch.save({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, tmp_path / "inputs.pt")
    env = {**base_env, "HF_HOME": str(tmp_path / "hf-peft-user")}
    proc = subprocess.run([sys.executable, "-c", PEFT_LOAD, str(model_dir), REPO, "round-0002", str(tmp_path / "inputs.pt"),
                           str(tmp_path / "logits.pt")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    loaded = torch.load(tmp_path / "logits.pt")

    store = HubStore(REPO, endpoint=url, cache_dir=tmp_path / "verify-cache")
    cfg = federation_config(store)
    state, _ = store.read_round(2)
    model = get_peft_model(BertForSequenceClassification.from_pretrained(model_dir), cfg.to_lora_config())
    get_strategy(cfg).prepare_client(model, state, "global").close()
    base = BertForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        federation = model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        untouched = base(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(loaded, federation, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loaded, untouched, atol=1e-4)  # the adapter does change the model

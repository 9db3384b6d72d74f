"""The examples run as their users run them, at tiny size: real processes, real files.

- examples/text_classification.py (the Hugging Face script with FederatedTrainer) simulates a
  federation of two client processes on this machine;
- examples/hub_federation/run.py runs the loopback Hub server, the aggregator and two clients as
  processes and loads the last round with plain PEFT from the server;
- examples/multi_gpu/: the same script under `accelerate launch` with 2 CPU processes (gloo).

The base model is a tiny random BERT saved with all-MiniLM-L6-v2's tokenizer; the data, tweets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from peft_federated.hub_integration import LocalStore

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SEQ = 16


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """A tiny random BERT classifier with MiniLM's tokenizer, and train/validation CSVs of tweets."""
    from peft_federated.data import load_twitter_sentiment
    from peft_federated.demo import minilm_path

    root = tmp_path_factory.mktemp("assets")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=24, max_position_embeddings=32,
                                                     num_labels=3))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    tweets = load_twitter_sentiment(max_examples=200, seed=0).map(lambda row: {"text": " ".join(row["text"].split())})
    tweets["train"].to_csv(str(root / "train.csv"))
    tweets["test"].to_csv(str(root / "validation.csv"))
    return {"model": root / "model", "train": root / "train.csv", "validation": root / "validation.csv"}


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def script_args(assets: dict[str, Path], out: Path, rounds: int = 2) -> list[str]:
    return ["--model_name_or_path", str(assets["model"]), "--train_file", str(assets["train"]),
            "--validation_file", str(assets["validation"]), "--output_dir", str(out), "--do_train", "--do_eval",
            "--max_seq_length", str(SEQ), "--per_device_train_batch_size", "8", "--learning_rate", "5e-3", "--use_cpu",
            "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "True", "--strategy", "fedex",
            "--num_clients", "2", "--num_rounds", str(rounds), "--local_steps", "2", "--lora_rank", "2", "--round_timeout", "240"]


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def eval_loss_of_round(assets: dict[str, Path], round_folder: Path) -> float:
    """The validation loss of a published round, loaded with plain PEFT (the script pads to max_seq_length)."""
    import pandas as pd

    rows = pd.read_csv(assets["validation"])
    tokenizer = AutoTokenizer.from_pretrained(assets["model"])
    batch = tokenizer(list(rows["text"]), padding="max_length", max_length=SEQ, truncation=True, return_tensors="pt")
    model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(assets["model"]), str(round_folder)).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor(rows["label"].to_numpy())))


def check_script_outputs(assets: dict[str, Path], out: Path, rounds: int) -> None:
    """What the HF script writes, against the store the federation published."""
    store = LocalStore(out / "federation")
    assert store.latest_round() == rounds
    for r in range(1, rounds + 1):  # both client processes contributed to every round
        _, meta = store.read_round(r)
        assert sorted(c["client_id"] for c in meta["contributions"]) == ["client-0", "client-1"]
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_loss"] > 0 and train["train_runtime"] > 0 and train["train_samples"] > 0
    everything = json.loads((out / "all_results.json").read_text())
    assert everything["train_loss"] == train["train_loss"] and "eval_accuracy" in everything
    assert "log_history" in json.loads((out / "trainer_state.json").read_text())
    # trainer.save_model() wrote the store's last round, tensor for tensor
    final = store.round_folder(rounds)
    saved, published = load_file(str(out / "adapter_model.safetensors")), load_file(str(final / "adapter_model.safetensors"))
    assert saved.keys() == published.keys() and saved
    for key, value in published.items():
        assert torch.equal(saved[key], value), key
    assert json.loads((out / "adapter_config.json").read_text()) == json.loads((final / "adapter_config.json").read_text())
    # trainer.evaluate() evaluated the final global round
    evaluated = json.loads((out / "eval_results.json").read_text())
    assert evaluated["eval_round"] == rounds and evaluated["eval_samples"] == 20
    assert evaluated["eval_loss"] == pytest.approx(eval_loss_of_round(assets, final), rel=1e-4)
    assert evaluated["eval_loss"] != pytest.approx(eval_loss_of_round(assets, store.round_folder(0)), rel=1e-4)


def test_text_classification_script_simulates_a_federation_and_saves_its_final_round(assets, tmp_path):
    out = tmp_path / "out"
    run([sys.executable, str(EXAMPLES / "text_classification.py"), *script_args(assets, out), "--logit_adjustment", "1.0"])
    check_script_outputs(assets, out, rounds=2)
    # the simulated client's process ran the same script: it too saved the final round
    saved = load_file(str(out / "client-1" / "adapter_model.safetensors"))
    for key, value in load_file(str(out / "adapter_model.safetensors")).items():
        assert torch.equal(saved[key], value), key


@pytest.mark.slow
def test_hub_federation_example_runs_every_party_as_a_process_and_loads_the_last_round(assets, tmp_path, monkeypatch):
    from helpers import isolate_hub_client
    from huggingface_hub import HfApi

    from peft_federated.hub_integration.hub_store import HubStore
    from peft_federated.testing import HubServer

    out, rounds = tmp_path / "hub-run", 2
    proc = run([sys.executable, str(EXAMPLES / "hub_federation" / "run.py"), "--model", str(assets["model"]), "--clients", "2",
                "--rounds", str(rounds), "--local-steps", "2", "--rank", "2", "--train-examples", "60", "--eval-examples", "20",
                "--max-length", str(SEQ), "--poll-interval", "0.2", "--timeout", "240", "--output-dir", str(out)], timeout=420)
    summary = json.loads((out / "summary.json").read_text())
    assert 'revision="round-0002"' in proc.stdout
    # The Hub's storage outlives its server: serve it again and check what run.py reported against it.
    isolate_hub_client(monkeypatch, tmp_path, disable_xet=True)
    with HubServer(out / "hub", tokens={}) as server:
        store = HubStore("org/sentiment-fed", endpoint=server.url, cache_dir=tmp_path / "verify")
        assert store.latest_round() == rounds
        refs = HfApi(endpoint=server.url).list_repo_refs("org/sentiment-fed")
        assert summary["rounds"] == {t.name: t.target_commit for t in refs.tags}
        assert sorted(summary["rounds"]) == [f"round-{r:04d}" for r in range(rounds + 1)]
        assert summary["main"] == summary["rounds"]["round-0002"]
        _, meta = store.read_round(rounds)
        assert sorted(c["client_id"] for c in meta["contributions"]) == ["client-0", "client-1"]
        for r in (0, rounds):  # what run.py loaded by tag with plain PEFT is each round's adapter
            loss = eval_loss_of_jsonl(assets["model"], store.round_folder(r), out / "eval.jsonl")
            assert summary[f"round-{r:04d}"]["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert summary["round-0002"]["eval_loss"] != pytest.approx(summary["round-0000"]["eval_loss"], rel=1e-6)


def eval_loss_of_jsonl(model_dir: Path, round_folder: Path, path: Path) -> float:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer([r["text"] for r in rows], truncation=True, max_length=SEQ, padding=True, return_tensors="pt")
    model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(model_dir), str(round_folder)).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    return float(torch.nn.functional.cross_entropy(logits, torch.tensor([r["label"] for r in rows])))


@pytest.mark.slow
def test_multi_gpu_example_trains_client_0_data_parallel_under_accelerate_launch(assets, tmp_path):
    """The example's accelerate config, with 2 CPU processes over gloo (the config's GPUs are not here)."""
    out, launcher = tmp_path / "out", Path(sys.executable).with_name("accelerate")
    proc = run([str(launcher), "launch", "--config_file", str(EXAMPLES / "multi_gpu" / "accelerate_config.yaml"),
                "--num_processes", "2", str(EXAMPLES / "text_classification.py"), *script_args(assets, out),
                "--per_device_train_batch_size", "4", "--logit_adjustment", "1.0",
                # 20 validation tweets, 10 a process: no last batch that accelerate pads with repeated tweets (the
                # Trainer's distributed eval_loss then averages a padded batch's mean, which is not the exact loss)
                "--per_device_eval_batch_size", "10"], timeout=360)
    for rank in (0, 1):
        assert f"Process rank: {rank}, device: cpu" in proc.stdout + proc.stderr
    assert "distributed training: True" in proc.stdout + proc.stderr
    # the simulated client-1, started by rank 0, is a single process of its own
    assert "Process rank: 0, device: cpu, distributed training: False" in (out / "client-1" / "client.log").read_text()
    check_script_outputs(assets, out, rounds=2)

"""The main job's command on a small setting: real MiniLM, real tweets, a real federation, and the
centralized reference it is printed beside."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from peft_federated import demo
from peft_federated.cli import main
from peft_federated.demo import find_reference, minilm_path, reference_settings, run_centralized, sentiment_data

SMALL = dict(train_examples=240, eval_examples=48, probe_examples=60)


def test_demo_command_runs_a_federation_beside_its_centralized_reference(tmp_path, capsys, monkeypatch):
    # the reference: centralized LoRA on the same small data, 2 rounds x 2 clients x 2 steps = 8 steps
    ref = run_centralized(8, **SMALL, eval_steps=4)
    train, test, _ = sentiment_data(240, 48)
    assert ref["training_examples"] == len(train) - 60  # the clients' tweets: the train split less the seed set
    assert ref["steps_evaluated"] == [0, 4, 8] and len(ref["accuracy"]) == 3 and ref["head"]["frozen"]
    path = tmp_path / "demo_reference.json"
    path.write_text(json.dumps({"runs": [ref]}))
    monkeypatch.setattr(demo, "REFERENCE", path)

    out = tmp_path / "run"
    argv = ["demo", "--output-dir", str(out), "--clients", "3", "--clients-per-round", "2", "--rounds", "2",
            "--local-steps", "2", "--train-examples", "240", "--eval-examples", "48", "--probe-examples", "60", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{") + 1:])
    assert summary["rounds_evaluated"] == [0, 2]  # every 5 rounds by default, and the last
    assert len(summary["accuracy_per_round"]) == 2 and all(0 <= a <= 1 for a in summary["accuracy_per_round"])
    assert "majority-class rate" in printed and "round 2/2" in printed and "head: linear probe on 60 tweets" in printed
    assert f"{ref['training_examples']} training tweets over 3 clients" in printed and f"{len(test)} held out" in printed
    # the demo before federation is the probe head alone, scored as the reference's step 0
    assert summary["accuracy_before"] == ref["accuracy"][0]
    assert summary["optimizer_steps"] == 8 and summary["centralized_accuracy"] == ref["final_accuracy"]
    assert f"centralized LoRA, same data and 8 optimizer steps: {ref['final_accuracy']:.3f}" in printed
    assert (out / "metrics.png").stat().st_size > 0
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and len(rounds[2]["contributions"]) == 2

    # the frozen probe head is in every round's adapter, unchanged, while the LoRA factors trained
    first, last = (load_file(out / "store" / "rounds" / f"round-000{r}" / "adapter_model.safetensors") for r in (0, 2))
    heads = [k for k in first if "classifier" in k]
    assert heads and all(torch.equal(first[k], last[k]) for k in heads)
    assert any(not torch.equal(first[k], last[k]) for k in first if "lora_" in k)
    # the printed adapter folder is a plain PEFT adapter
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    loaded = PeftModel.from_pretrained(base, summary["adapter"])
    assert loaded.peft_config["default"].r == 8


def test_a_reference_counts_only_for_exactly_its_settings(tmp_path):
    settings = reference_settings(8000, 800, 48, 600, True, 8, 16, 3e-3, 500, 0)
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"runs": [{"settings": settings, "final_accuracy": 0.7}]}))
    assert find_reference(settings, path)["final_accuracy"] == 0.7
    assert find_reference({**settings, "steps": 400}, path) is None
    assert find_reference({**settings, "learning_rate": 1e-3}, path) is None
    assert find_reference(settings, tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert find_reference(settings, tmp_path / "bad.json") is None


def test_demo_with_a_personalized_strategy_scores_each_clients_own_model(tmp_path, capsys, monkeypatch):
    # a reference entry for these settings (1 round x 3 clients x 2 steps), to check how its line reads
    settings = reference_settings(240, 48, 48, 60, True, 8, 16, 3e-3, 6, 0)
    (tmp_path / "ref.json").write_text(json.dumps({"runs": [{"settings": settings, "final_accuracy": 0.5,
                                                             "final_macro_f1": 0.4}]}))
    monkeypatch.setattr(demo, "REFERENCE", tmp_path / "ref.json")
    argv = ["demo", "--output-dir", str(tmp_path / "run"), "--strategy", "fedsa", "--clients", "3", "--clients-per-round", "3",
            "--rounds", "1", "--local-steps", "2", "--train-examples", "240", "--eval-examples", "48", "--probe-examples", "60",
            "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{") + 1:])
    rounds = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
    per_client = rounds[-1]["client_eval"]
    assert sorted(per_client) == ["client-00", "client-01", "client-02"]
    scores = [m["eval_accuracy"] for m in per_client.values()]
    assert summary["personal_mean_accuracy"] == pytest.approx(sum(scores) / 3)
    assert summary["personal_worst_accuracy"] == min(scores)
    assert "fedsa keeps a personal part on each client" in printed and "each client's own model on its own test split" in printed
    # the federation trained without the clients' own test splits; the centralized reference pooled them all
    assert "centralized LoRA, every client tweet pooled, their own test splits included and 6 optimizer steps: 0.500" in printed

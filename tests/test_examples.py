"""Every example in examples/ runs end to end at tiny size, as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_llm_instruction_tuning_runs_federation_and_centralized_baseline(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(EXAMPLES / "llm_instruction_tuning.py"), "--model", "tiny", "--output-dir", str(out),
           "--train-examples", "40", "--eval-examples", "12", "--rounds", "2", "--local-steps", "1", "--batch-size", "2",
           "--threads", "1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "before federation: accuracy" in proc.stdout and "elapsed" in proc.stdout
    data = json.loads((out / "llm_instruction_tuning.json").read_text())
    assert [r["round"] for r in data["rounds"]] == [0, 1, 2]
    assert data["settings"]["steps"] == 2 * 4 * 1 and data["settings"]["strategy"] == "fedit"
    for point in [*data["rounds"], data["centralized"]]:
        assert 0 <= point["accuracy"] <= 1 and point["answer_loss"] > 0
        assert point["accuracy"] * 12 == round(point["accuracy"] * 12)  # a count of exact matches out of 12
    assert data["before"] == data["rounds"][0] and data["federated"] == data["rounds"][-1]
    assert len(data["client_labels"]) == 4 and sum(sum(h.values()) for h in data["client_labels"]) == 40
    assert (out / "llm_instruction_tuning.png").stat().st_size > 0
    assert data["seconds"]["total"] >= data["seconds"]["federation"] > 0

    # the last round is a plain PEFT adapter on the tiny base, and the printed score is that model's
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    example = load_example("llm_instruction_tuning")
    base_dir = out / "tiny-llama"
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), data["adapter"])
    from peft_federated.data import LABELS, load_twitter_sentiment

    test = load_twitter_sentiment(max_examples=52, seed=0, test_fraction=12 / 52)["test"]
    held_out = example.as_instructions(test, [i % 4 for i in range(len(test))], LABELS)
    scores = example.AnswerScorer(tokenizer, held_out["prompt"], held_out["label"], LABELS)(model)
    assert abs(scores["eval_answer_loss"] - data["federated"]["answer_loss"]) < 1e-4
    assert scores["eval_accuracy"] == data["federated"]["accuracy"]


def test_answer_scorer_matches_full_sequence_likelihood(tmp_path):
    """The scorer's log-likelihoods equal those of the whole answered conversation (prompt + word + end of
    turn) run through the model, with words of one and of several tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_federated.models import tiny_chat_llama

    example = load_example("llm_instruction_tuning")
    folder = tiny_chat_llama(tmp_path / "tiny", seed=3)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    words = ["positive", "neutral", "unhappily grumpy"]  # the last is several WordPiece tokens
    prompts = [[{"role": "user", "content": text}] for text in ("what a lovely day", "the bus is late again", "ok")]
    labels = [0, 2, 1]
    scores = example.AnswerScorer(tokenizer, prompts, labels, words, batch_size=2)(model)

    expected_correct, expected_losses = 0, []
    for prompt, label in zip(prompts, labels):
        prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        end = tokenizer(" [SEP] ", add_special_tokens=False)["input_ids"]
        loglik = []
        for word in words:
            answer = tokenizer(word, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([list(prompt_ids) + answer + end])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].double(), -1)
            loglik.append(sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(answer)))
        expected_correct += max(range(3), key=loglik.__getitem__) == label
        expected_losses.append(-loglik[label] / len(tokenizer(words[label], add_special_tokens=False)["input_ids"]))
    assert len(tokenizer(words[2], add_special_tokens=False)["input_ids"]) > 1
    assert scores["eval_accuracy"] == expected_correct / 3
    assert abs(scores["eval_answer_loss"] - sum(expected_losses) / 3) < 1e-4

"""FederatedTrainer.train() is one Trainer run: TrainOutput, callbacks once, continuous logs, and the
federation's final model in the trainer when it returns."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from tiny import LABELS, VOCAB, federate, tiny_args, tiny_bert, tiny_config, token_dataset
from transformers import BertConfig, BertForSequenceClassification, TrainerCallback
from transformers.trainer_utils import TrainOutput

from peft_federated.adapter import effective_weight, lora_layers, read_tensors
from peft_federated.hub_integration import LocalStore
from peft_federated.trainer import FederatedTrainer, run_simulation


class Recorder(TrainerCallback):
    def __init__(self):
        self.events = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append("begin")

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("end", state.global_step))


def run(tmp_path, **args):
    """A fedex federation of alice and bob, 3 rounds of 2 steps, each trainer with a `Recorder`."""
    cfg = tiny_config("fedex", num_rounds=3, local_steps=2)
    store, trainers, outputs = federate(tmp_path, cfg, model_seed=9, callbacks=lambda: [Recorder()], **args)
    return cfg, store, trainers, outputs


def test_train_is_one_run_and_returns_a_train_output(tmp_path):
    cfg, store, trainers, outputs = run(tmp_path, logging_strategy="steps", logging_steps=1)
    trainer, out = trainers[0], outputs["alice"]
    assert isinstance(out, TrainOutput)
    assert out.global_step == trainer.state.global_step == cfg.num_rounds * cfg.local_steps
    assert out.training_loss > 0 and out.metrics["train_loss"] == pytest.approx(out.training_loss)
    assert {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"} <= set(out.metrics)
    recorder = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Recorder))
    assert recorder.events == ["begin", ("end", cfg.num_rounds * cfg.local_steps)]
    losses = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in losses] == list(range(1, cfg.num_rounds * cfg.local_steps + 1))
    assert [h["round"] for h in losses] == [r for r in range(cfg.num_rounds) for _ in range(cfg.local_steps)]
    assert all("round" in h for h in trainer.state.log_history)
    assert trainer.state.log_history[-1]["train_loss"] == pytest.approx(out.training_loss)


def test_after_train_the_model_is_the_federations_final_round(tmp_path):
    cfg, store, trainers, _ = run(tmp_path)
    final, _ = store.read_round(cfg.num_rounds)
    assert final.base_delta, "fedex's final round should carry a base change"
    for trainer in trainers:
        tensors = read_tensors(trainer.model)
        for key, value in final.tensors.items():
            torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)
    # save_model writes the federation's model as plain PEFT: base change included
    trainer = trainers[0]
    trainer.save_model(str(tmp_path / "saved"))
    torch.manual_seed(9)
    base = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=24, num_labels=LABELS, max_position_embeddings=10))
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "saved")).eval()
    model = trainer.model.eval()
    for name in lora_layers(model):
        torch.testing.assert_close(effective_weight(loaded, name), effective_weight(model, name), rtol=1e-6, atol=1e-6)
    ids = torch.tensor(token_dataset(8, 3)["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert "eval_loss" in trainer.evaluate()


def test_resume_from_checkpoint_says_the_store_is_the_checkpoint(tmp_path):
    cfg = tiny_config("rolora", num_rounds=1)
    trainer = FederatedTrainer(model=tiny_bert(cfg), args=tiny_args(tmp_path), train_dataset=token_dataset(20, 0),
                               federated_config=cfg, client_id="c0", store=LocalStore(tmp_path / "fed"))
    with pytest.raises(ValueError, match="resumes from its store"):
        trainer.train(resume_from_checkpoint=True)


def test_run_simulation_leaves_the_final_global_model_in_the_model(tmp_path):
    cfg = tiny_config("fedex", num_rounds=2, clients_per_round=2)
    model = tiny_bert(cfg)
    data = {f"c{k}": token_dataset(30, k, label_bias=k) for k in range(3)}
    res = run_simulation(model, cfg, data, tiny_args(tmp_path), tmp_path / "store", progress=False)
    final, _ = res.store.read_round(2)
    tensors = read_tensors(model)
    for key, value in final.tensors.items():
        torch.testing.assert_close(tensors[key], value, rtol=0, atol=0)


def test_run_simulation_evaluates_every_eval_every_rounds_and_the_last(tmp_path):
    cfg = tiny_config("fedit", num_rounds=5, clients_per_round=2, local_steps=1)
    data = {f"c{k}": token_dataset(20, k) for k in range(2)}
    calls = []
    res = run_simulation(tiny_bert(cfg), cfg, data, tiny_args(tmp_path), tmp_path / "store", progress=False, eval_every=2,
                         evaluate_fn=lambda m: calls.append(1) or {"score": float(len(calls))})
    assert [h["round"] for h in res.history if h["metrics"]] == [0, 2, 4, 5] and len(calls) == 4
    assert res.final_metrics == {"score": 4.0}
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="eval_every"):
            run_simulation(tiny_bert(cfg), cfg, data, tiny_args(tmp_path), tmp_path / "other", progress=False, eval_every=bad)


def test_trainers_and_stores_are_exported_at_the_top_level():
    import peft_federated
    from peft_federated.trainer.trl import FederatedDPOTrainer, FederatedSFTTrainer

    assert peft_federated.FederatedTrainer is FederatedTrainer and peft_federated.run_simulation is run_simulation
    assert (peft_federated.FederatedSFTTrainer, peft_federated.FederatedDPOTrainer) == (FederatedSFTTrainer, FederatedDPOTrainer)
    assert peft_federated.LocalStore is LocalStore
    with pytest.raises(AttributeError):
        peft_federated.NoSuchThing  # noqa: B018

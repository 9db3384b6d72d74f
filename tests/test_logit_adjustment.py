"""`logit_adjustment`: each client trains on logits + tau * log(its label frequencies); evaluation does not."""

from __future__ import annotations

import math

import pytest
import torch
from peft import PeftModel
from tiny import LABELS, tiny_args, tiny_base, tiny_bert, tiny_config, token_dataset

from peft_federated import FederatedTrainer
from peft_federated.trainer import run_simulation


def _trainer(tmp_path, tau, dataset, **args):
    cfg = tiny_config("fedit", logit_adjustment=tau)
    model = tiny_bert(cfg)
    return FederatedTrainer(model=model, args=tiny_args(tmp_path, **args), train_dataset=dataset, federated_config=cfg,
                            client_id="alice"), model


def _batch(dataset, n=6):
    rows = dataset.select(range(n))
    return {k: torch.tensor(rows[k]) for k in ("input_ids", "attention_mask", "labels")}


@pytest.mark.parametrize("tau", [1.0, 0.37])
def test_training_loss_is_cross_entropy_of_adjusted_logits(tmp_path, tau):
    dataset = token_dataset(30, seed=1, label_bias=2)  # skewed: mostly label 2
    trainer, model = _trainer(tmp_path, tau, dataset)
    batch = _batch(dataset)
    model.train()
    torch.manual_seed(0)
    loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
    # hand reference in float64: counts from the dataset, add-one smoothed over the model's classes
    counts = [sum(1 for y in dataset["labels"] if y == c) for c in range(LABELS)]
    log_prior = torch.tensor([math.log((n + 1) / (len(dataset) + LABELS)) for n in counts], dtype=torch.float64)
    logits = outputs["logits"].detach().double()
    z = logits + tau * log_prior
    expected = -(z.gather(1, batch["labels"][:, None]).squeeze(1) - torch.logsumexp(z, 1)).mean()
    assert counts[2] > counts[0] and counts[2] > counts[1]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    assert abs(loss.item() - plain) > 1e-3  # the adjustment changes the loss
    loss.backward()  # and it is a loss to train on
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_evaluation_sees_the_plain_model(tmp_path):
    dataset = token_dataset(30, seed=1, label_bias=2)
    trainer, model = _trainer(tmp_path, 1.0, dataset)
    batch = _batch(dataset)
    model.eval()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        reference = model(**batch).loss
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    metrics = trainer.evaluate(eval_dataset=dataset)
    with torch.no_grad():
        plain = model(**{k: torch.tensor(dataset[k]) for k in ("input_ids", "attention_mask", "labels")}).loss
    assert metrics["eval_loss"] == pytest.approx(plain.item(), rel=1e-4)


def test_prior_is_the_current_clients(tmp_path):
    a, b = token_dataset(30, seed=1, label_bias=0), token_dataset(30, seed=2, label_bias=2)
    trainer, _ = _trainer(tmp_path, 1.0, a)
    prior_a = trainer._label_log_prior(LABELS).clone()
    trainer.train_dataset = b  # the simulation swaps clients on one trainer
    prior_b = trainer._label_log_prior(LABELS)
    assert prior_a.argmax() == 0 and prior_b.argmax() == 2
    assert torch.allclose(prior_a.exp().sum(), torch.tensor(1.0)) and torch.allclose(prior_b.exp().sum(), torch.tensor(1.0))


@pytest.mark.parametrize("tau", [0, -1.0, float("inf"), float("nan"), True, "1"])
def test_config_refuses_bad_tau(tau):
    with pytest.raises(ValueError, match="logit_adjustment"):
        tiny_config("fedit", logit_adjustment=tau)


def test_refusals_say_what_to_do(tmp_path):
    dataset = token_dataset(12, seed=1)
    trainer, model = _trainer(tmp_path, 1.0, dataset.rename_column("labels", "target"))
    model.train()
    with pytest.raises(ValueError, match="'label' or 'labels' column"):
        trainer.compute_loss(model, _batch(dataset))
    trainer, model = _trainer(tmp_path, 1.0, dataset, label_smoothing_factor=0.1)
    model.train()
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        trainer.compute_loss(model, _batch(dataset))
    wide = dataset.map(lambda r: {"labels": 7})
    trainer, model = _trainer(tmp_path, 1.0, wide)
    model.train()
    with pytest.raises(ValueError, match="3 classes"):
        trainer.compute_loss(model, _batch(dataset))


def test_simulation_with_logit_adjustment_publishes_plain_rounds(tmp_path):
    cfg = tiny_config("fedit", logit_adjustment=1.0, num_rounds=2, clients_per_round=2)
    clients = {"alice": token_dataset(40, 1, label_bias=0), "bob": token_dataset(40, 2, label_bias=2)}
    result = run_simulation(tiny_bert(cfg), cfg, clients, tiny_args(tmp_path), tmp_path / "store",
                            eval_dataset=token_dataset(30, 3), progress=False)
    assert len(result.history) == 3 and all("eval_loss" in h["metrics"] for h in result.history)
    model = PeftModel.from_pretrained(tiny_base(), result.store.round_path(2))  # plain PEFT, nothing of the adjustment
    assert model.peft_config["default"].r == cfg.r

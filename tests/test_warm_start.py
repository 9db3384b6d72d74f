"""The classification head's warm start: a linear probe fitted to optimality, frozen, part of round 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset
from tiny import VOCAB, tiny_args, tiny_bert, tiny_config, token_dataset

from peft_federated import get_strategy
from peft_federated.warm_start import balanced_class_weight, fit_linear_probe, head_linear, probe_features


def ragged_dataset(n: int, seed: int, skew: bool = False) -> Dataset:
    """Examples of 3 to 8 tokens, labelled by their first token's third of the vocabulary (class 0
    four times as frequent as the others with `skew`)."""
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "attention_mask": [], "label": []}
    for i in range(n):
        ids = rng.integers(1, VOCAB, size=int(rng.integers(3, 9)))
        if skew and i % 2:
            ids[0] = rng.integers(1, VOCAB // 3)
        rows["input_ids"].append(ids.tolist())
        rows["attention_mask"].append([1] * len(ids))
        rows["label"].append(int(min((ids[0] - 1) // ((VOCAB - 1) // 3 + 1), 2)))
    return Dataset.from_dict(rows)


def pad(rows: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad input_ids and attention_mask with zeros (as DataCollatorWithPadding does)."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.tensor([r[k] + [0] * (width - len(r[k])) for r in rows]) for k in ("input_ids", "attention_mask")}
    return out


def pooled_one_by_one(model, dataset) -> np.ndarray:
    """What BERT's classifier sees for each example, computed alone (no padding, no batching)."""
    bert = model.base_model.model.bert
    model.eval()
    with torch.no_grad():
        return np.stack([bert(input_ids=torch.tensor([r["input_ids"]]), attention_mask=torch.tensor([r["attention_mask"]]))
                         .pooler_output[0].double().numpy() for r in dataset])


def objective_gradient(X, y, W, b, weights, l2) -> tuple[np.ndarray, np.ndarray]:
    """Gradient of mean_i w_{y_i} CE_i / mean_i w_{y_i} + l2 ||W||^2, by hand."""
    logits = X @ W.T + b
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    R = (P - np.eye(W.shape[0])[y]) * weights[y][:, None] / weights[y].sum()
    return R.T @ X + 2 * l2 * W, R.sum(0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_the_probe_is_the_weighted_logistic_regression_optimum_on_the_heads_features(dtype, class_weight):
    model = tiny_bert(tiny_config("fedit")).to(dtype)
    data = ragged_dataset(90, seed=1, skew=True)
    X, y = probe_features(model, data, pad, batch_size=16)
    reference = pooled_one_by_one(model, data)
    np.testing.assert_allclose(X.numpy(), reference, atol=1e-12 if dtype == torch.float64 else 1e-5)
    assert y.tolist() == data["label"]

    l2 = 1e-2
    fit = fit_linear_probe(model, data, pad, l2=l2, class_weight=class_weight, batch_size=16)
    counts = np.bincount(y.numpy(), minlength=3)
    weights = np.ones(3) if class_weight is None else len(y) / (3 * counts)
    assert counts[0] > 2 * counts[1] and np.allclose(fit.class_weight, weights)
    linear = head_linear(model)
    W, b = linear.weight.detach().double().numpy(), linear.bias.detach().double().numpy()
    assert np.abs(W).max() > 1e-2  # it moved from the zero start
    gW, gb = objective_gradient(reference, y.numpy(), W, b, weights, l2)
    tol = 1e-7 if dtype == torch.float64 else 1e-4  # float32: the head's values are rounded after the fit
    assert np.abs(gW).max() < tol and np.abs(gb).max() < tol
    pred = (reference @ W.T + b).argmax(1)
    assert fit.train_accuracy == pytest.approx((pred == y.numpy()).mean())
    assert fit.train_recall == pytest.approx([(pred[y.numpy() == c] == c).mean() for c in range(3)])


def test_balanced_weights_give_each_class_the_same_total_weight():
    w = balanced_class_weight([0, 0, 0, 0, 1, 2, 2], 4)
    assert w == pytest.approx([7 / 16, 7 / 4, 7 / 8, 0.0])


def test_the_frozen_probe_head_is_round_0s_head_and_stays_through_training(tmp_path):
    from peft_federated.trainer import run_simulation

    cfg = tiny_config("rolora", num_rounds=2, local_steps=2, clients_per_round=2)
    model = tiny_bert(cfg)
    fit_linear_probe(model, token_dataset(60, 7), pad)
    linear = head_linear(model)
    fitted = {k: v.detach().clone() for k, v in linear.state_dict().items()}
    assert not any(p.requires_grad for p in linear.parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_B" in n)
    assert get_strategy(cfg).initial_state(model).extra_keys()  # the head travels with round 0

    clients = {"a": token_dataset(24, 1, label_bias=0), "b": token_dataset(24, 2, label_bias=2)}
    result = run_simulation(model, cfg, clients, tiny_args(tmp_path), tmp_path / "store", progress=False)
    for rnd in (0, 2):
        state, _ = result.store.read_round(rnd)
        heads = {k: v for k, v in state.tensors.items() if k in state.extra_keys()}
        assert heads and all(torch.equal(v, fitted[k.rsplit(".", 1)[1]]) for k, v in heads.items())
    lora_B = [v for k, v in result.store.read_round(2)[0].tensors.items() if "lora_B" in k]
    assert any(v.abs().max() > 0 for v in lora_B)  # while the LoRA factors trained


def test_freeze_false_leaves_the_head_trainable():
    model = tiny_bert(tiny_config("fedit"))
    fit = fit_linear_probe(model, token_dataset(30, 3), pad, freeze=False)
    assert not fit.frozen and all(p.requires_grad for p in head_linear(model).parameters())


def test_refusals_say_what_to_fix():
    model = tiny_bert(tiny_config("fedit"))
    data = token_dataset(20, 0)
    with pytest.raises(ValueError, match="no 'labels' or 'label' column"):
        fit_linear_probe(model, data.remove_columns("labels"), pad)
    with pytest.raises(ValueError, match=r"Labels must lie in \[0, 2\]"):
        fit_linear_probe(model, data.map(lambda r: {"labels": 5}), pad)
    with pytest.raises(ValueError, match="3 finite weights"):
        fit_linear_probe(model, data, pad, class_weight=[1.0, float("nan"), 1.0])
    with pytest.raises(ValueError, match="class_weight must be None, 'balanced'"):
        fit_linear_probe(model, data, pad, class_weight="inverse")
    with pytest.raises(ValueError, match="empty"):
        fit_linear_probe(model, data.select([]), pad)
    with pytest.raises(ValueError, match="no classification head"):
        head_linear(model.base_model.model.bert)
    assert all(p.requires_grad for p in head_linear(model).parameters())  # nothing was changed by a refusal

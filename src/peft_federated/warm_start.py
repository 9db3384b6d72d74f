"""Warm start of a classification head: fit it as a linear probe before the federation's round 0.

A fresh head is what label-skewed clients pull apart first: a few local steps on a client that
holds mostly one class move the head's bias towards that class, and the averaged head swings with
the clients drawn each round. Fitting the head first as a linear probe on the pretrained model's
features (linear probing, then fine-tuning: LP-FT, Kumar et al., 2022) and keeping it frozen
leaves the federation the LoRA factors alone to train.

Call `fit_linear_probe` on the `PeftModel` before round 0 is published (`run_simulation`, or
`peft_federated.aggregator.initialize`): the fitted head is then part of round 0 and of every
round's plain PEFT adapter. It needs a few hundred labelled examples in one place (a labelled
seed set the aggregator holds, or public data); no client data is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from peft.utils import ModulesToSaveWrapper
from torch import Tensor


@dataclass
class LinearProbe:
    """What `fit_linear_probe` fitted: examples, the objective at the solution and the probe's
    accuracy and per-class recall on the examples it was fitted on, and the class weights used."""

    examples: int
    loss: float
    train_accuracy: float
    train_recall: list[float]
    class_weight: list[float]
    frozen: bool


def head_linear(model: torch.nn.Module) -> torch.nn.Linear:
    """The layer a linear probe fits: the last `nn.Linear` of the model's trained head (PEFT's
    `modules_to_save` copy of `classifier` / `score`; the plain head on a model without PEFT)."""
    wrappers = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    if len(wrappers) > 1:
        raise ValueError(f"The model has {len(wrappers)} modules_to_save; a linear probe fits one classification head.")
    if wrappers:
        head = wrappers[0].modules_to_save[wrappers[0].active_adapters[0]]
    else:
        head = next((getattr(model, n) for n in ("classifier", "score") if isinstance(getattr(model, n, None), torch.nn.Module)), None)
        if head is None:
            raise ValueError("The model has no classification head to fit: build it for sequence classification "
                             "(task_type='SEQ_CLS', whose modules_to_save is its classifier / score).")
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"The classification head {type(head).__name__} has no nn.Linear layer to fit.")
    return linears[-1]


@torch.no_grad()
def probe_features(
    model: torch.nn.Module, dataset, data_collator: Callable, batch_size: int = 64, label_column: Optional[str] = None
) -> tuple[Tensor, Tensor]:
    """(features, labels): what reaches the head's last linear layer for each example of `dataset`
    (the model in eval mode, so no dropout), as float64 on the CPU, and the examples' labels."""
    linear = head_linear(model)
    label_column = label_column or next((c for c in ("labels", "label") if c in dataset.column_names), None)
    if label_column is None:
        raise ValueError(f"The probe's dataset has no 'labels' or 'label' column (its columns: {dataset.column_names}).")
    if len(dataset) == 0:
        raise ValueError("The probe's dataset is empty: give it labelled examples.")
    labels = torch.as_tensor(dataset[label_column], dtype=torch.long)
    inputs = [c for c in dataset.column_names if c not in ("label", "labels", label_column)]
    features: list[Tensor] = []
    hook = linear.register_forward_hook(lambda module, args, output: features.append(args[0].detach().double().cpu()))
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select_columns(inputs)[start:start + batch_size]
            batch = data_collator([dict(zip(rows, values)) for values in zip(*rows.values())])
            model(**{k: v.to(device) for k, v in batch.items() if isinstance(v, Tensor)})
    finally:
        hook.remove()
        model.train(was_training)
    if any(f.dim() != 2 for f in features):
        raise ValueError("The head's last linear layer sees per-token features (a decoder's score head, pooled after it); "
                         "fit_linear_probe fits heads that see one feature vector per example (BERT-like classifiers).")
    return torch.cat(features), labels


def balanced_class_weight(labels: Sequence[int] | Tensor, num_classes: int) -> list[float]:
    """n / (num_classes * n_c) per class (scikit-learn's "balanced"); 0 for a class with no example."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.long), minlength=num_classes).double()
    return [0.0 if c == 0 else float(counts.sum() / (num_classes * c)) for c in counts]


def fit_linear_probe(
    model: torch.nn.Module,
    dataset,
    data_collator: Callable,
    *,
    l2: float = 1e-3,
    class_weight: Union[None, str, Sequence[float]] = None,
    freeze: bool = True,
    batch_size: int = 64,
    max_iter: int = 500,
    label_column: Optional[str] = None,
) -> LinearProbe:
    """Fit the model's classification head (its last linear layer) as a multinomial logistic
    regression on the frozen model's features of `dataset`, in place, and freeze it (`freeze`).

    Minimises mean_i w_{y_i} CE(W x_i + b, y_i) / mean_i w_{y_i} + l2 * ||W||^2 (the bias is not
    penalised) by L-BFGS in float64 from zero, a strictly convex problem with one solution.
    `class_weight`: None (every example alike), "balanced" (`balanced_class_weight`, for a skewed
    probe set) or one weight per class. Rows are collated with `data_collator` (e.g.
    `DataCollatorWithPadding`) in batches of `batch_size`; the labels come from `label_column`
    ("labels" or "label" by default).
    """
    if not l2 >= 0:
        raise ValueError(f"l2 must be >= 0, got {l2}.")
    linear = head_linear(model)
    X, y = probe_features(model, dataset, data_collator, batch_size, label_column)
    num_classes = linear.out_features
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"Labels must lie in [0, {num_classes - 1}] for a head of {num_classes} classes; got {y.min()} to {y.max()}.")
    weights = _class_weight(class_weight, y, num_classes)
    W = torch.zeros(num_classes, X.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True) if linear.bias is not None else None
    params = [W] + ([b] if b is not None else [])
    w_i = weights[y]
    optimizer = torch.optim.LBFGS(params, max_iter=max_iter, tolerance_grad=1e-10, tolerance_change=1e-14,
                                  history_size=20, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        logits = X @ W.T + (b if b is not None else 0)
        ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
        return (w_i * ce).sum() / w_i.sum() + l2 * W.pow(2).sum()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        linear.weight.copy_(W.to(linear.weight.dtype))
        if b is not None:
            linear.bias.copy_(b.to(linear.bias.dtype))
        pred = (X @ W.T + (b if b is not None else 0)).argmax(-1)
        loss = float(objective())
    if freeze:
        linear.requires_grad_(False)
    recall = [float((pred[y == c] == c).double().mean()) if (y == c).any() else float("nan") for c in range(num_classes)]
    return LinearProbe(examples=len(y), loss=loss, train_accuracy=float((pred == y).double().mean()), train_recall=recall,
                       class_weight=weights.tolist(), frozen=freeze)


def _class_weight(class_weight: Any, y: Tensor, num_classes: int) -> Tensor:
    if class_weight is None:
        return torch.ones(num_classes, dtype=torch.float64)
    if class_weight == "balanced":
        return torch.tensor(balanced_class_weight(y, num_classes), dtype=torch.float64)
    if isinstance(class_weight, str):
        raise ValueError(f"class_weight must be None, 'balanced' or one weight per class, got {class_weight!r}.")
    weights = torch.as_tensor(list(class_weight), dtype=torch.float64)
    if weights.shape != (num_classes,) or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not weights.sum() > 0:
        raise ValueError(f"class_weight needs {num_classes} finite weights >= 0, not all 0; got {list(class_weight)}.")
    return weights


__all__ = ["LinearProbe", "balanced_class_weight", "fit_linear_probe", "head_linear", "probe_features"]

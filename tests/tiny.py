"""A tiny random BERT classifier and a synthetic labelled token dataset, for trainer tests."""

from __future__ import annotations

import numpy as np
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from peft_federated import FederatedLoraConfig

VOCAB, SEQ, LABELS = 40, 8, 3


def tiny_bert(config: FederatedLoraConfig, seed: int = 0):
    torch.manual_seed(seed)
    bert = BertForSequenceClassification(
        BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=24, num_labels=LABELS, max_position_embeddings=SEQ + 2)
    )
    return get_peft_model(bert, config.to_lora_config())


def tiny_config(strategy: str = "rolora", **kw) -> FederatedLoraConfig:
    kw.setdefault("num_rounds", 3)
    kw.setdefault("local_steps", 3)
    # intermediate.dense is 24 x 16: non-square
    return FederatedLoraConfig(strategy=strategy, r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"],
                               task_type="SEQ_CLS", **kw)


def token_dataset(n: int, seed: int, label_bias: int | None = None) -> Dataset:
    """Label = which third of the vocabulary the first token falls in: learnable, with optional skew."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, SEQ))
    if label_bias is not None:
        ids[: n * 2 // 3, 0] = rng.integers(1 + label_bias * (VOCAB // 3), (label_bias + 1) * (VOCAB // 3), size=n * 2 // 3)
    labels = np.minimum((ids[:, 0] - 1) // ((VOCAB - 1) // 3 + 1), LABELS - 1)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(), "labels": labels.tolist()})


def tiny_args(tmp_path, **kw) -> TrainingArguments:
    base = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, per_device_eval_batch_size=32,
                learning_rate=5e-3, report_to=[], save_strategy="no", disable_tqdm=True, logging_strategy="no",
                use_cpu=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}

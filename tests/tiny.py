"""A tiny random BERT classifier, a synthetic labelled token dataset, and a federation of trainers
through a local store, for trainer tests."""

from __future__ import annotations

import threading

import numpy as np
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from peft_federated import FederatedLoraConfig

VOCAB, SEQ, LABELS = 40, 8, 3


def tiny_base(seed: int = 0) -> BertForSequenceClassification:
    """The tiny random BERT classifier without LoRA (seeded)."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=24, num_labels=LABELS, max_position_embeddings=SEQ + 2)
    )


def tiny_bert(config: FederatedLoraConfig, seed: int = 0):
    return get_peft_model(tiny_base(seed), config.to_lora_config())


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


def federate(tmp_path, cfg: FederatedLoraConfig, ids=("alice", "bob"), model_seed: int = 0, callbacks=None, **args):
    """Clients `train()` through a LocalStore while `serve` aggregates in a thread: (store, trainers,
    each client's TrainOutput). `callbacks()` makes each trainer's callbacks; `args` go to `tiny_args`."""
    from peft_federated.aggregator import initialize, serve
    from peft_federated.hub_integration import LocalStore
    from peft_federated.trainer import FederatedTrainer

    store = LocalStore(tmp_path / "fed")
    initialize(store, cfg, tiny_bert(cfg))
    agg = threading.Thread(target=serve, args=(store, cfg, list(ids)), kwargs={"poll_interval": 0.05, "deadline": 60}, daemon=True)
    agg.start()
    # Trainers are built here: building one (re)sets accelerate's process-wide state, which must
    # not race with another thread's training. Only train() runs concurrently.
    trainers = [FederatedTrainer(model=tiny_bert(cfg, seed=model_seed), args=tiny_args(tmp_path / cid, **args),
                                 train_dataset=token_dataset(30, k), eval_dataset=token_dataset(20, 50), federated_config=cfg,
                                 client_id=cid, store=store, poll_interval=0.05, round_timeout=60,
                                 callbacks=callbacks() if callbacks else None)
                for k, cid in enumerate(ids)]
    outputs, errors = {}, []

    def client(trainer):
        try:
            outputs[trainer.client_id] = trainer.train()
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=client, args=(t,)) for t in trainers]
    for t in threads:
        t.start()
    for t in threads + [agg]:
        t.join(120)
    assert not errors
    return store, trainers, outputs

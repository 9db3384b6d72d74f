"""The two roles of a real federation, each its own process: the aggregator and a client.

    peft-federated aggregate --repo org/fed --clients a,b,c --model PATH --strategy fedex --rounds 10 ...
    peft-federated client --repo org/fed --client-id a --data train.json

The aggregator defines the federation: it builds the `FederatedLoraConfig`, publishes round 0 from
the base model's config (no weight is loaded: `skeleton`) and serves the rounds. A client reads that config back from round 0
(adapter_config.json + federation.json), so both sides always agree; a client needs the repo id, its
data and the base model (by default the `base_model_name_or_path` the aggregator recorded).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from peft_federated.config import FederatedLoraConfig
from peft_federated.data.sft import SFTDataError, check_not_empty, prepare_sft_data, read_dataset
from peft_federated.hub_integration.layout import read_metadata
from peft_federated.hub_integration.store import LocalStore, RoundStore

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import BitsAndBytesConfig

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


def auto_model_class(task_type: Optional[str]):
    """The transformers auto class that builds the base model of `task_type` (PEFT's names; None: `AutoModel`)."""
    import transformers

    if task_type is not None and task_type not in AUTO_MODELS:
        raise ValueError(f"Unsupported task_type {task_type!r}; choose one of {', '.join(AUTO_MODELS)}.")
    return getattr(transformers, AUTO_MODELS.get(task_type, "AutoModel"))


def load_base_model(path: str, task_type: Optional[str], num_labels: Optional[int] = None,
                    quantization: Optional["BitsAndBytesConfig"] = None):
    """The base model for `task_type` (PEFT's names: SEQ_CLS, CAUSAL_LM, ...) from a folder or Hub id;
    with `quantization` (see `peft_federated.quantization.quantization_config`) loaded in 4-bit or
    8-bit on this process's device and prepared for LoRA training (`prepare_model_for_kbit_training`)."""
    cls = auto_model_class(task_type)
    kwargs = {"num_labels": num_labels} if num_labels else {}
    if quantization is not None:
        from peft_federated.quantization import load_quantized

        return load_quantized(cls, path, quantization, **kwargs)
    return cls.from_pretrained(path, **kwargs)


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


def load_client_data(path: "str | Path | Dataset", tokenizer=None, max_length: int = 128, text_column: str = "text",
                     label_column: str = "label"):
    """A classification client's training set: a folder saved with `save_to_disk` (of a DatasetDict,
    its "train" split), a .json/.jsonl/.csv file, or a `Dataset`. Rows with `input_ids` are used as
    they are; otherwise `text_column` is tokenized (truncated to `max_length`). `label_column` becomes `labels`."""
    from datasets import Dataset

    data = path if isinstance(path, Dataset) else read_dataset(path)
    source = "the data" if isinstance(path, Dataset) else str(path)
    check_not_empty(data, source)
    if "input_ids" not in data.column_names:
        if text_column not in data.column_names:
            raise ValueError(f"{source} has neither input_ids nor a {text_column!r} column (columns: {data.column_names}).")
        if tokenizer is None:
            raise ValueError(f"{source} holds raw text but the base model has no tokenizer: save one with the model, or "
                             "give already tokenized data (an input_ids column).")
        data = data.map(lambda rows: tokenizer(rows[text_column], truncation=True, max_length=max_length),
                        batched=True, remove_columns=[text_column])
    if label_column in data.column_names and label_column != "labels":
        data = data.rename_column(label_column, "labels")
    return data


def start_aggregator(store: RoundStore, config: FederatedLoraConfig, model_path: str, num_labels: Optional[int] = None) -> int:
    """Publish round 0 unless the store has rounds; the latest round. No base weight is loaded: round 0
    comes from the model's config.json and the LoRA shapes (`skeleton.skeleton_model`)."""
    from peft_federated.aggregator import initialize
    from peft_federated.skeleton import skeleton_model

    if (latest := store.latest_round()) is not None:
        return latest
    return initialize(store, config, skeleton_model(model_path, config, num_labels))


def run_aggregator(store: RoundStore, config: FederatedLoraConfig, model_path: str, clients: Optional[list[str]] = None,
                   num_labels: Optional[int] = None, **serve_kwargs: Any) -> list[dict[str, Any]]:
    """Publish round 0 (`start_aggregator`: from the model's config, no base weights), then aggregate every
    round. `serve_kwargs`: quorum, deadline, min_clients, poll_interval (see `aggregator.serve`). Returns the history."""
    from peft_federated.aggregator import serve

    start_aggregator(store, config, model_path, num_labels)
    serve(store, config, clients, **serve_kwargs)
    return store.history()


class PrecisionError(ValueError):
    """Mixed precision this machine cannot train in."""


def check_precision(bf16: bool = False, fp16: bool = False) -> None:
    """Refuse mixed precision this machine cannot train in (checked before any round trains).

    fp16 needs a CUDA GPU; bf16 needs a CUDA GPU that supports it (compute capability 8.0+), or runs
    on the CPU (PyTorch's CPU autocast)."""
    import torch

    if bf16 and fp16:
        raise PrecisionError("Give one of --bf16 and --fp16, not both.")
    if fp16 and not torch.cuda.is_available():
        raise PrecisionError("--fp16 needs a CUDA GPU and this machine has none: drop --fp16 to train in float32, or use --bf16.")
    if bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        major, minor = torch.cuda.get_device_capability()
        raise PrecisionError(f"--bf16 needs a GPU with bfloat16 support (compute capability 8.0+); "
                         f"{torch.cuda.get_device_name()} has {major}.{minor}: use --fp16, or drop --bf16 to train in float32.")


def _tokenizer(model_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError):  # a model saved without a tokenizer: fine for tokenized data
        return None


def run_client(store: RoundStore, client_id: str, data: str | Path, model_path: Optional[str] = None,
               num_labels: Optional[int] = None, output_dir: Optional[str] = None, learning_rate: float = 5e-4,
               batch_size: int = 8, max_length: Optional[int] = None, seed: int = 0, text_column: Optional[str] = None,
               label_column: str = "label", poll_interval: float = 2.0, round_timeout: float = 3600.0,
               messages_column: Optional[str] = None, prompt_column: Optional[str] = None,
               completion_column: Optional[str] = None, chat_template: Optional[str] = None,
               gradient_accumulation_steps: int = 1, gradient_checkpointing: bool = False, bf16: bool = False,
               fp16: bool = False, packing: bool = False, quantization: Optional["BitsAndBytesConfig"] = None,
               personal_dir: Optional[str] = None) -> dict[str, float]:
    """Take part in every round of the federation in `store`; returns the training metrics (the Trainer's names).

    The federation's task type (from round 0) picks the trainer: CAUSAL_LM trains with
    `FederatedSFTTrainer` (TRL) on text, prompt/completion, messages or tokenized data (see
    `peft_federated.data.sft`; `max_length` defaults to TRL's 1024); other task types with
    `FederatedTrainer` on labelled data (`max_length` defaults to 128). Data that cannot train and
    mixed precision the machine lacks are refused before any round trains. `quantization`: a
    `BitsAndBytesConfig` (4-bit or 8-bit base; build it with `quantization.quantization_config`).
    Under a personalized strategy (FedSA-LoRA) the client's personal tensors (lora_B, the head) stay in
    `personal_dir` (default `<output_dir>/personal`, a folder per client id), are never uploaded, and
    are read back when the client restarts."""
    from peft import get_peft_model

    check_precision(bf16, fp16)
    template = Path(chat_template).read_text() if chat_template is not None else None
    table = read_dataset(data)
    check_not_empty(table, str(data))
    config = federation_config(store, timeout=round_timeout, poll_interval=poll_interval)
    model_path = model_path or config.base_model_name_or_path
    if not model_path:
        raise ValueError("The federation does not name its base model: pass the base model's path or id.")
    tokenizer = _tokenizer(model_path)
    causal = config.task_type == "CAUSAL_LM"
    if packing and not causal:
        raise ValueError(f"--packing is for language-model (CAUSAL_LM) federations; this one is {config.task_type}.")
    if causal:
        if tokenizer is None:
            raise SFTDataError(f"The base model {model_path} has no tokenizer, which TRL's SFTTrainer needs: save one beside the model.")
        if template is not None:
            tokenizer.chat_template = template
        dataset, _ = prepare_sft_data(table, tokenizer, text_column, messages_column, prompt_column, completion_column, str(data))
    else:
        dataset = load_client_data(table, tokenizer, max_length or 128, text_column or "text", label_column)
    model = get_peft_model(load_base_model(model_path, config.task_type, num_labels, quantization), config.to_lora_config())
    common = dict(
        output_dir=output_dir or f"peft-federated-{client_id}", per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, seed=seed, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
        gradient_accumulation_steps=gradient_accumulation_steps, gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None, bf16=bf16, fp16=fp16,
    )
    loop = dict(federated_config=config, client_id=client_id, store=store, poll_interval=poll_interval, round_timeout=round_timeout,
                personal_dir=personal_dir)
    if causal:
        from trl import SFTConfig

        from peft_federated.trainer.trl import FederatedSFTTrainer

        args = SFTConfig(**common, max_length=max_length or 1024, packing=packing)
        trainer = FederatedSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, **loop)
    else:
        from transformers import DataCollatorWithPadding, TrainingArguments

        from peft_federated.trainer import FederatedTrainer

        trainer = FederatedTrainer(
            model=model, args=TrainingArguments(**common), train_dataset=dataset,
            data_collator=DataCollatorWithPadding(tokenizer) if tokenizer is not None else None, **loop,
        )
    return trainer.train().metrics

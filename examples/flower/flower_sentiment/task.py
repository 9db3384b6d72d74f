"""The example's model, data and federation settings, read from the run config by both apps."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from peft_federated import FederatedLoraConfig
from peft_federated.demo import minilm_path, sentiment_config


def federation_config(run_config) -> FederatedLoraConfig:
    """The federation the ServerApp runs (its clients receive it with every round)."""
    return sentiment_config(
        str(run_config["strategy"]), int(run_config["rank"]), num_rounds=int(run_config["num-server-rounds"]),
        clients_per_round=int(run_config["clients-per-round"]), local_steps=int(run_config["local-steps"]),
    )


def model_path(run_config) -> str:
    return str(run_config["model"]) or minilm_path()


def peft_model(config: FederatedLoraConfig, run_config):
    """The base model with a 3-way head (seeded, the same in every process) and the federation's LoRA. With a
    seed set (`probe-examples`) the head is frozen: the ServerApp fits it as a linear probe before round 0,
    every client gets it with round 0, and the clients train the LoRA factors alone (as the demo does)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from peft_federated.warm_start import head_linear

    torch.manual_seed(int(run_config["seed"]))
    base = AutoModelForSequenceClassification.from_pretrained(model_path(run_config), num_labels=3)
    model = get_peft_model(base, config.to_lora_config())
    if int(run_config["probe-examples"]):
        head_linear(model).requires_grad_(False)
    return model


def _data_key(run_config) -> tuple[int, int, int, int]:
    return (int(run_config["train-examples"]), int(run_config["eval-examples"]), int(run_config["max-length"]),
            int(run_config["seed"]))


@lru_cache(maxsize=1)
def _tweets(train_examples: int, eval_examples: int, max_length: int, seed: int):
    from peft_federated.demo import sentiment_data

    return sentiment_data(train_examples, eval_examples, max_length, seed)


def tweets(run_config):
    """(train, held-out, tokenizer): the tweets tokenized with MiniLM's tokenizer, once per process."""
    return _tweets(*_data_key(run_config))


def seed_set(run_config):
    """(the ServerApp's labelled seed set for the head's warm start, the tweets left for the clients)."""
    from peft_federated.demo import split_seed_set

    return split_seed_set(tweets(run_config)[0], int(run_config["probe-examples"]), int(run_config["seed"]))


@lru_cache(maxsize=1)
def _shards(key: tuple[int, int, int, int], probe_examples: int, num_partitions: int, alpha: float):
    from peft_federated.data import dirichlet_partition
    from peft_federated.demo import split_seed_set

    pool = split_seed_set(_tweets(*key)[0], probe_examples, key[-1])[1]
    return dirichlet_partition(pool, num_partitions, alpha=alpha, label_column="label", seed=key[-1])


def shard(run_config, partition_id: int, num_partitions: int):
    """A node's training tweets: its shard of a Dirichlet(alpha) label-skewed split of the clients' tweets,
    the same in every process."""
    return _shards(_data_key(run_config), int(run_config["probe-examples"]), num_partitions,
                   float(run_config["dirichlet-alpha"]))[partition_id]


def store_dir(run_config, run_id: int) -> Path:
    return Path(str(run_config["store-dir"]) or f"runs/flower-sentiment/run-{run_id}").resolve()

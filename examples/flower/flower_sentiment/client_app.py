"""The ClientApp: each node trains its shard of the tweets with FederatedTrainer, one MiniLM per process."""

from __future__ import annotations

import tempfile
from pathlib import Path

from transformers import DataCollatorWithPadding

from peft_federated.demo import sentiment_args
from peft_federated.flower import client_app, node_client_id
from peft_federated.trainer import FederatedTrainer

from flower_sentiment import task


def model_fn(config, context):
    return task.peft_model(config, context.run_config)


def trainer_fn(model, config, context):
    rc, node = context.run_config, context.node_config
    client_id = node_client_id(context)
    tokenizer = task.tweets(rc)[2]
    return FederatedTrainer(
        model=model,
        args=sentiment_args(Path(tempfile.gettempdir()) / "flower-sentiment" / client_id, int(rc["batch-size"]),
                            float(rc["learning-rate"]), int(rc["seed"])),
        train_dataset=task.shard(rc, int(node["partition-id"]), int(node["num-partitions"])),
        data_collator=DataCollatorWithPadding(tokenizer),
        federated_config=config,
        client_id=client_id,
    )


app = client_app(model_fn, trainer_fn)

"""`FederatedTrainer`, or any `FederatedMixin` trainer (TRL's included), as a Flower ClientApp.

A ClientApp process (a Ray actor in simulation, serving many virtual nodes in turn) keeps ONE base
model for all its nodes and rounds, built the first time a message arrives (`model_fn`), and one
trainer per node on it (`trainer_fn`: the node's data and client id). Each round it loads the global
round from the message (the strategy's `prepare_client`, inside `train_round`), trains its local steps
through the ordinary Trainer loop and replies with exactly the strategy's payload. The federation's
config comes from the server's message, as a store client reads it from round 0, so both sides agree.
"""

from __future__ import annotations

import gc
from typing import Any, Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from peft_federated.config import FederatedLoraConfig
from peft_federated.flower.records import (
    CLIENT_ID, CLIENT_ID_ACTION, FEDERATION, config_to_json, read_config, read_round, reply_content,
)

ModelFn = Callable[[FederatedLoraConfig, Context], Any]
TrainerFn = Callable[[Any, FederatedLoraConfig, Context], Any]

# This process's base model (one for every node it serves) and each node's trainer on it.
_MODEL: dict[str, Any] = {}
_TRAINERS: dict[tuple[int, int], Any] = {}


def client_app(model_fn: ModelFn, trainer_fn: TrainerFn) -> ClientApp:
    """A Flower ClientApp that trains each round with a federated trainer.

    `model_fn(config, context)`: the PeftModel for the federation's `config` (base model +
    `get_peft_model(base, config.to_lora_config())`), built once per process.
    `trainer_fn(model, config, context)`: the node's trainer on `model`, built once per node, e.g.
    `FederatedTrainer(model=model, args=..., train_dataset=<the node's data>, federated_config=config,
    client_id=node_client_id(context))`. Its `client_id` names the node in the federation (sampling,
    refusals, published contributions).
    """
    app = ClientApp()

    @app.query(CLIENT_ID_ACTION)
    def client_id(msg: Message, context: Context) -> Message:
        trainer = _trainer(model_fn, trainer_fn, read_config(msg.content), context)
        return Message(RecordDict({FEDERATION: ConfigRecord({CLIENT_ID: trainer.client_id})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        state, config = read_round(msg.content)
        trainer = _trainer(model_fn, trainer_fn, config, context)
        payload, num_samples, metrics = trainer.train_round(state)
        return Message(reply_content(payload, num_samples, metrics, state.round), reply_to=msg)

    return app


def node_client_id(context: Context) -> str:
    """A node's client id: `client-<partition-id>` in a simulation (as `run_simulation`'s clients are
    named by their index), else `node-<node id>`."""
    partition = context.node_config.get("partition-id")
    return f"client-{partition}" if partition is not None else f"node-{context.node_id}"


def _trainer(model_fn: ModelFn, trainer_fn: TrainerFn, config: FederatedLoraConfig, context: Context):
    """The node's trainer on this process's model, built on first use; a new config drops both."""
    from peft_federated.trainer import FederatedMixin

    key = f"{getattr(model_fn, '__module__', '')}.{getattr(model_fn, '__qualname__', '')}\n{config_to_json(config)}"
    if _MODEL.get("key") != key:
        _TRAINERS.clear()
        _MODEL.clear()
        gc.collect()  # the previous model goes before the next is built
        _MODEL.update(key=key, model=model_fn(config, context))
    node = (context.run_id, context.node_id)
    if node not in _TRAINERS:
        trainer = trainer_fn(_MODEL["model"], config, context)
        if not isinstance(trainer, FederatedMixin):
            raise TypeError(f"trainer_fn must return a FederatedMixin trainer (FederatedTrainer, FederatedSFTTrainer, ...), "
                            f"got {type(trainer).__name__}.")
        if config_to_json(trainer.federated_config) != config_to_json(config):
            raise ValueError("trainer_fn must build its trainer with the federation's config it is given "
                             "(federated_config=config): the server's settings decide what each round trains.")
        _TRAINERS[node] = trainer
    return _TRAINERS[node]

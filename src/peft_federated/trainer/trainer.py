"""`FederatedTrainer`: a `transformers.Trainer` whose training is a client's federated rounds.

Each round is one ordinary `Trainer` training run of `local_steps` steps (or `local_epochs`):
callbacks, `report_to`, gradient accumulation, mixed precision and evaluation work as usual.
`FederatedMixin` carries the behaviour, so TRL trainers get it too (`FederatedSFTTrainer`).

Choices, documented:
- The optimizer is created afresh each round (clients are stateless between rounds, and the set
  of trainable factors changes with RoLoRA); its moments do not carry over.
- The learning-rate schedule spans the whole federation (`schedule_across_rounds`): round t's
  scheduler starts where round t-1's ended.
- Under `accelerate launch`, only the main process reads and writes the store; the state it read
  is broadcast, so every rank holds the same adapter. The model is re-wrapped each round, so DDP
  sees the factors that train this round.
"""

from __future__ import annotations

import gc
import time
import zlib
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

import torch
from transformers import Trainer, set_seed

from peft_federated.hub_integration.store import RoundStore, check_client_id
from peft_federated.state import GlobalState
from peft_federated.strategies import ClientRound, get_strategy

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig


@contextmanager
def _gc_frozen():
    """Every `Trainer.train()` starts with a full `gc.collect()` (accelerate's `free_memory`), which
    scans every object of the process: about a second with a model and datasets in memory, paid
    each round by each client. Objects that exist before the round are set aside for its duration,
    so that collection scans only the round's own; they are collectable again afterwards."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


class FederatedMixin:
    """Federated rounds on top of any `Trainer` subclass. Put it first: `class X(FederatedMixin, SFTTrainer)`."""

    def __init__(
        self,
        *args: Any,
        federated_config: "FederatedLoraConfig",
        client_id: str = "client-0",
        store: Optional[RoundStore] = None,
        poll_interval: float = 2.0,
        round_timeout: float = 3600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.federated_config = federated_config
        self.strategy = get_strategy(federated_config)
        self.client_id = check_client_id(client_id)
        self.store = store
        self.poll_interval, self.round_timeout = poll_interval, round_timeout
        self.client_round: Optional[ClientRound] = None
        self._fed_round = 0
        self._base_seed = self.args.seed

    # ---- one round --------------------------------------------------------------------------------
    def train_round(self, state: GlobalState) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Train this client's round `state.round` from the global `state`: (payload, num_samples, metrics)."""
        cfg, args = self.federated_config, self.args
        self._fed_round = state.round
        self.client_round = self.strategy.prepare_client(self.model, state, self.client_id)
        if cfg.local_steps is not None:
            args.max_steps = cfg.local_steps
        else:
            args.max_steps, args.num_train_epochs = -1, cfg.local_epochs
        # A fresh optimizer for this round's trainable factors, a new data order every round.
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model
        args.seed = self._base_seed + 1009 * state.round + zlib.crc32(self.client_id.encode()) % 1000
        set_seed(args.seed)  # dropout and data order depend only on (seed, round, client): resumable
        with _gc_frozen():
            output = super().train()
        payload = self.client_round.payload()
        self.client_round = None
        metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
        metrics["train_loss"] = float(output.training_loss)
        return payload, len(self.train_dataset), metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        reg = self.client_round.regularizer() if self.client_round is not None else None
        if reg is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + reg.to(loss.device, loss.dtype), outputs
        return result + reg.to(result.device, result.dtype)

    def create_scheduler(self, num_training_steps: int, optimizer: Optional[torch.optim.Optimizer] = None):
        if not self.federated_config.schedule_across_rounds or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        offset = self._fed_round * num_training_steps
        scheduler = super().create_scheduler(num_training_steps * self.federated_config.num_rounds, optimizer)
        if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) and offset:
            scheduler.lr_lambdas = [lambda step, f=f: f(step + offset) for f in scheduler.lr_lambdas]
            for group, base_lr, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base_lr * f(0)
            scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
        return scheduler

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs = {**logs, "round": self._fed_round}
        super().log(logs, *args, **kwargs)

    # ---- a client's whole federation through the store ------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Take part in every round through `store`: wait for each global round, train, submit.

        Resumable: rounds this client already submitted, or that closed while it was away, are skipped. Returns the last round's metrics.
        """
        if self.store is None:
            raise ValueError("FederatedTrainer.train() needs store=...; or call train_round(state) yourself.")
        last: dict[str, float] = {}
        for round in range(self.federated_config.num_rounds):
            state, done = self._sync_state(round)
            if done:
                continue
            payload, num_samples, last = self.train_round(state)
            if self.is_world_process_zero():
                meta = {"num_samples": num_samples, "metrics": last, "base_round": round}
                self.store.submit_update(round, self.client_id, payload, meta)
            self.accelerator.wait_for_everyone()
        return last

    def _sync_state(self, round: int) -> tuple[Optional[GlobalState], bool]:
        """The global state of `round` and whether to skip it (this client already submitted it, or
        the round is already closed): read on the main process (waiting until the round is
        published), broadcast to the others."""
        box: list[Any] = [None]
        if self.is_world_process_zero():
            deadline = time.monotonic() + self.round_timeout
            while (latest := self.store.latest_round()) is None or latest < round:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Round {round} was not published within {self.round_timeout:.0f}s; is the aggregator running?")
                time.sleep(self.poll_interval)
            closed = latest > round  # aggregated without this client (e.g. it was down): rejoin at the latest round
            box[0] = (None if closed else self.store.read_round(round)[0], closed or self.client_id in self.store.list_updates(round))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class FederatedTrainer(FederatedMixin, Trainer):
    """A `transformers.Trainer` that trains a federated client's rounds (see `FederatedMixin`)."""

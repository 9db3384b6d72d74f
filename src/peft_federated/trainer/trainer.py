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
- `train()` is one run to the Trainer's callbacks and loggers: `on_train_begin` and `on_train_end`
  fire once, `state.global_step` and `state.log_history` continue across rounds (each entry carries
  its `round`), and it returns a `TrainOutput`. When it returns, the model holds the federation's
  final global round, so `evaluate()`, `save_model()` and `push_to_hub()` act on the federation's
  model (saved as the plain PEFT adapter the store publishes, base change included).
- `logit_adjustment` (label skew): in training only, the loss is the cross-entropy of the logits plus
  tau * log(the client's own label frequencies); evaluation and `prediction_step` see the plain model.
- Personalized strategies (`Strategy.personalized`: FedSA-LoRA keeps lora_B and the head): each round
  starts from the client's own personal tensors, read from `personal_dir` (default
  `args.output_dir/personal`, one folder per client id), and writes them back there after training,
  before the update is submitted (`peft_federated.personal`). They never enter an upload and survive
  a restart; a client without any starts from the shared model (B = 0). `personalized()` puts the
  client's personalized model in place, e.g. for `evaluate()`.
"""

from __future__ import annotations

import gc
import logging
import os
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from transformers import ProgressCallback, Trainer, TrainerState, set_seed
from transformers.trainer_utils import TrainOutput, speed_metrics

from peft_federated import privacy
from peft_federated.hub_integration.layout import write_round
from peft_federated.hub_integration.store import RoundStore, check_client_id
from peft_federated.personal import client_folder, read_personal, write_personal
from peft_federated.state import GlobalState
from peft_federated.strategies import ClientRound, get_strategy

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig

logger = logging.getLogger(__name__)


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


@dataclass
class _Run:
    """What carries over between the rounds of one `train()`: the Trainer state and the totals."""

    state: Optional[TrainerState] = None
    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0


def _skip_event(args, state, control, **kwargs):
    """A train begin/end event the callbacks do not see; the control is reset as a new run's would be."""
    control.should_training_stop = False
    return control


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
        personal_dir: Optional[str | os.PathLike] = None,
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
        self._run: Optional[_Run] = None
        self.global_state: Optional[GlobalState] = None  # the federation's final round, once train() returns
        self._personal_dir = personal_dir

    @property
    def personal_dir(self) -> Path:
        """Where each client's personal tensors live (`personal_dir`, default `args.output_dir/personal`),
        in a folder per client id; used only by personalized strategies."""
        return Path(self._personal_dir) if self._personal_dir is not None else Path(self.args.output_dir) / "personal"

    def _personal_start(self, state: GlobalState, client_id: str) -> tuple[Optional[int], Optional[dict[str, torch.Tensor]]]:
        """(snapshot round, tensors) a client starts `state.round` from: its latest personal tensors, or
        (None, None) when it has none or the strategy keeps nothing personal."""
        if not self.strategy.personalized:
            return None, None
        folder = client_folder(self.personal_dir, client_id)
        return self._on_main_process(lambda: read_personal(folder, state, self.strategy, client_id, self._federation))

    @property
    def _federation(self) -> Optional[str]:
        """The store's federation (`RoundStore.federation`), which personal tensors record and are checked against."""
        return self.store.federation if self.store is not None else None

    # ---- one round --------------------------------------------------------------------------------
    def train_round(self, state: GlobalState) -> tuple[dict[str, torch.Tensor], int, dict[str, float]]:
        """Train this client's round `state.round` from the global `state`: (payload, num_samples, metrics)."""
        cfg, args = self.federated_config, self.args
        self._fed_round = state.round
        started_from, personal = self._personal_start(state, self.client_id)
        self.client_round = self.strategy.prepare_client(self.model, state, self.client_id, personal=personal)
        if cfg.local_steps is not None:
            args.max_steps = cfg.local_steps
        else:
            args.max_steps, args.num_train_epochs = -1, cfg.local_epochs
        # A fresh optimizer for this round's trainable factors, a new data order every round.
        self.optimizer, self.lr_scheduler = None, None
        self.model_wrapped = self.model
        args.seed = self._base_seed + 1009 * state.round + zlib.crc32(self.client_id.encode()) % 1000
        set_seed(args.seed)  # dropout and data order depend only on (seed, round, client): resumable
        with _gc_frozen(), self._one_run_callbacks():
            output = super().train()
        payload = self.client_round.payload()
        if self.strategy.personalized and self.is_world_process_zero():  # kept here, before anything is submitted
            write_personal(client_folder(self.personal_dir, self.client_id), state.round + 1, self.client_round.personal(),
                           self.strategy, self.client_id, keep_from=started_from, federation=self._federation)
        if cfg.dp and cfg.dp_mode == "client":  # clipped and noised before it leaves the client
            start = self.strategy.client_start(state, self.client_id, self.client_round.rank)
            payload = privacy.privatize_update(payload, start, cfg, state.round, self.client_id)
        self.client_round = None
        metrics = {k: float(v) for k, v in output.metrics.items() if isinstance(v, (int, float))}
        metrics["train_loss"] = float(output.training_loss)
        if self._run is not None:  # the run's totals, over this round's optimizer steps
            run, steps = self._run, self.state.global_step - self._run.steps
            run.state, run.steps, run.loss_sum = self.state, self.state.global_step, run.loss_sum + metrics["train_loss"] * steps
            run.samples += steps * (self.state.train_batch_size or args.per_device_train_batch_size) * args.gradient_accumulation_steps * args.world_size
        return payload, len(self.train_dataset), metrics

    @contextmanager
    def personalized(self, state: Optional[GlobalState] = None, client_id: Optional[str] = None):
        """The model as a client uses it, for the duration of a `with` block: the global round `state`
        (default: the federation's final round, once `train()` returned) with the client's personal
        tensors over it (its latest at most that round; none: the shared model). For a strategy without
        personal tensors, the client's start of a round (the global model, or its rank truncation under
        HetLoRA or FlexLoRA). Afterwards the model holds the global round again.

            trainer.train()
            trainer.evaluate()                 # the federation's global model
            with trainer.personalized():
                trainer.evaluate()             # this client's personalized model
        """
        state = state if state is not None else self.global_state
        if state is None:
            raise ValueError("No global round to personalize: call train() first, or pass state (e.g. store.read_round()[0]).")
        client_id = self.client_id if client_id is None else check_client_id(client_id)
        _, personal = self._personal_start(state, client_id)
        self.strategy.prepare_client(self.model, state, client_id, personal=personal).close()
        try:
            yield self.model
        finally:
            self.strategy.prepare_client(self.model, state, "global").close()

    def _on_main_process(self, read: Callable[[], Any]) -> Any:
        """`read()` on the main process, its result broadcast to the others (under `accelerate launch`)."""
        box = [read() if self.is_world_process_zero() else None]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def _one_run_callbacks(self):
        """Inside `train()`, a round's own `on_train_begin` fires only for the run's first round, and its
        `on_train_end` not at all (`train()` fires it once at the end)."""
        handler, run = self.callback_handler, self._run
        quiet = [] if run is None else ["on_train_end"] + (["on_train_begin"] if run.state is not None else [])
        for name in quiet:
            setattr(handler, name, _skip_event)
        try:
            yield
        finally:
            for name in quiet:
                delattr(handler, name)

    def _init_training_state(self, max_steps, *args, **kwargs):
        """A round of `train()` continues the run's Trainer state: global step, log history, flos."""
        result = super()._init_training_state(max_steps, *args, **kwargs)
        run = self._run
        if run is not None and run.state is not None:
            prev, state = run.state, self.state
            state.global_step, state.log_history = prev.global_step, prev.log_history
            state.total_flos, state.num_input_tokens_seen = prev.total_flos, prev.num_input_tokens_seen
            state.max_steps = prev.global_step + max_steps  # the round ends after its own steps
            for cb in self.callback_handler.callbacks:
                if isinstance(cb, ProgressCallback) and cb.training_bar is not None:
                    cb.training_bar.total = state.max_steps
                    cb.training_bar.refresh()
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tau = self.federated_config.logit_adjustment
        # the wrapped model's own flag, not a DDP wrapper's: evaluation sets only the wrapped model to eval
        if tau is not None and self.accelerator.unwrap_model(model).training and "labels" in inputs:
            result = self._logit_adjusted_loss(model, inputs, tau, return_outputs)
        else:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        reg = self.client_round.regularizer() if self.client_round is not None else None
        if reg is None:
            return result
        if return_outputs:
            loss, outputs = result
            return loss + reg.to(loss.device, loss.dtype), outputs
        return result + reg.to(result.device, result.dtype)

    def _logit_adjusted_loss(self, model, inputs, tau: float, return_outputs: bool):
        """Cross-entropy of logits + tau * log(this client's label frequencies) (`logit_adjustment`)."""
        if self.label_smoother is not None or self.compute_loss_func is not None:
            raise ValueError("logit_adjustment computes the classification loss itself: it cannot be combined with "
                             "label_smoothing_factor or compute_loss_func. Turn one of them off.")
        labels = inputs["labels"]
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        logits = outputs["logits"]
        if logits.dim() != 2 or labels.dim() != 1 or labels.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"logit_adjustment is for single-label classification (logits [batch, classes], integer "
                             f"labels [batch]); got logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                             f"{labels.dtype}. Set logit_adjustment=None for this task.")
        prior = self._label_log_prior(logits.shape[-1]).to(logits.device, logits.dtype)
        loss = torch.nn.functional.cross_entropy(logits + tau * prior, labels)
        return (loss, outputs) if return_outputs else loss

    def _label_log_prior(self, num_labels: int) -> torch.Tensor:
        """log of this client's label frequencies, add-one smoothed, from its training set (cached per dataset)."""
        dataset = self.train_dataset
        cached = getattr(self, "_label_prior_cache", None)
        if cached is not None and cached[0] is dataset and cached[1].numel() == num_labels:
            return cached[1]
        column = next((c for c in ("labels", "label") if c in (getattr(dataset, "column_names", None) or ())), None)
        if column is None:
            raise ValueError("logit_adjustment needs the client's label frequencies: its training set must be a "
                             "datasets.Dataset with a 'label' or 'labels' column.")
        labels = torch.as_tensor(dataset[column], dtype=torch.int64).flatten()
        if labels.numel() and labels.min() < 0:
            raise ValueError(f"The client's '{column}' column holds a negative label ({int(labels.min())}).")
        counts = torch.bincount(labels, minlength=num_labels)
        if counts.numel() != num_labels:
            raise ValueError(f"The client's labels go up to {counts.numel() - 1} but the model has {num_labels} classes.")
        prior = ((counts.double() + 1) / (counts.sum() + num_labels)).log().float()
        self._label_prior_cache = (dataset, prior)
        return prior

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
    def train(self, resume_from_checkpoint=None, trial=None, **kwargs) -> TrainOutput:
        """Take part in every round through `store`: wait for each global round, train, submit; then
        load the federation's final round into the model (waiting up to `round_timeout` for it).

        Resumable: rounds this client already submitted, or that closed while it was away, are
        skipped, so a restarted client calls `train()` again; the store is its checkpoint.
        Returns a `TrainOutput` over the rounds this call trained (`metrics` named as the Trainer's).
        """
        if resume_from_checkpoint:
            raise ValueError(
                "A federated client resumes from its store, not from a Trainer checkpoint: call train() again "
                "without resume_from_checkpoint. Rounds this client already submitted, or that closed while it "
                "was away, are skipped.")
        if self.store is None:
            raise ValueError("FederatedTrainer.train() needs store=...; or call train_round(state) yourself.")
        start, rounds = time.time(), self.federated_config.num_rounds
        self._run = run = _Run()
        try:
            for round in range(rounds):
                state, done = self._sync_state(round)
                if done:
                    continue
                payload, num_samples, last = self.train_round(state)
                if self.is_world_process_zero():
                    meta = {"num_samples": num_samples, "metrics": last, "base_round": round}
                    self.store.submit_update(round, self.client_id, payload, meta)
                self.accelerator.wait_for_everyone()
            self.global_state, _ = self._sync_state(rounds, final=True)
        finally:
            self._run = None
        self.strategy.prepare_client(self.model, self.global_state, "global").close()
        self._fed_round = rounds
        if run.state is None:  # nothing left to train: still one run to the callbacks
            self.control = self.callback_handler.on_train_begin(self.args, self.state, self.control)
        train_loss = run.loss_sum / max(run.steps, 1)
        metrics = speed_metrics("train", start, num_samples=run.samples, num_steps=run.steps)
        metrics.update(total_flos=self.state.total_flos, train_loss=train_loss)
        self.log(dict(metrics))
        self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
        return TrainOutput(self.state.global_step, train_loss, metrics)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        """After `train()`, save the federation's final round as the store publishes it (a plain PEFT
        adapter with the base change as extra ranks, and federation.json); checkpoints during the
        rounds save the client's model as the Trainer does."""
        super()._save(output_dir, state_dict=state_dict)
        if self.global_state is not None and self._run is None and self.args.should_save:
            write_round(output_dir or self.args.output_dir, self.global_state, self.federated_config)

    def _sync_state(self, round: int, final: bool = False) -> tuple[Optional[GlobalState], bool]:
        """The global state of `round` and whether to skip it (this client already submitted it, or
        the round is already closed): read on the main process (waiting until the round is
        published), broadcast to the others. `final`: the federation's last round, read whatever
        came after it."""
        def read() -> tuple[Optional[GlobalState], bool]:
            deadline = time.monotonic() + self.round_timeout
            while (latest := self.store.latest_round()) is None or latest < round:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Round {round} was not published within {self.round_timeout:.0f}s; is the aggregator "
                                       "running? (It publishes no round while it refuses every update: its log says why.)")
                time.sleep(self.poll_interval)
            closed = latest > round and not final  # aggregated without this client (e.g. it was down): rejoin at the latest round
            if closed:
                return None, True
            state, meta = self.store.read_round(round)
            self._report_refusals(meta, round)
            return state, not final and self.client_id in self.store.list_updates(round)

        return self._on_main_process(read)

    def _report_refusals(self, meta: dict[str, Any], round: int) -> None:
        """Warn when published round `round` says the aggregator refused this client's update, with its reason."""
        for refusal in meta.get("refused", []):
            if isinstance(refusal, dict) and refusal.get("client_id") == self.client_id:
                logger.warning("The aggregator refused %s's update for round %d (it is not in round %d): %s",
                               self.client_id, round - 1, round, refusal.get("reason"))


class FederatedTrainer(FederatedMixin, Trainer):
    """A `transformers.Trainer` that trains a federated client's rounds (see `FederatedMixin`)."""

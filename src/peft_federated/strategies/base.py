"""What every strategy shares: the client-side round on a PeftModel and the streaming server side.

A `Strategy` is one algorithm, both sides. Subclasses override small hooks:
- client side: `trainable_factors` (which of lora_A / lora_B train this round), `client_rank`,
  `client_start` (the tensors a client starts from), `regularizer`, `upload_rank`;
- personalization: `personal_factors` and `personal_extras` declare what each client trains but keeps
  for itself (FedSA-LoRA's lora_B and head); every other tensor a client trains is uploaded;
- server side: `module_aggregator_cls` (how one module's factors merge) and `next_strategy_state`.
Sample-count vs uniform weighting and update validation live here once, for every strategy.

The server side streams, like NVIDIA FLARE's `accept_model`: `Aggregator.accept(update, ...)` folds
one client's update into running means (`WeightedMean`) and `result()` gives the next `GlobalState`,
so server memory does not grow with the number of clients. `Aggregator.accept_files` takes a round's
update files together and folds them piece by piece, with the same result bit for bit: how the
pieces stream (runs of mapped bytes or modules, worker threads) is `peft_federated.fold`'s.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, ClassVar, Optional, Sequence

import torch
from torch import Tensor

from peft_federated import adapter, fold, privacy
from peft_federated.fold import FileUpdate, WeightedMean
from peft_federated.state import GlobalState, LowRank, lora_key, lora_modules, parse_lora_key
from peft_federated.strategies.validation import (
    InvalidUpdateError, all_finite, change_norm, check_update, clip_change, squared_change,
)
from peft_federated.update_file import TensorSpec, UpdateFile

if TYPE_CHECKING:
    from peft import PeftModel

    from peft_federated.config import FederatedLoraConfig

BOTH = ("lora_A", "lora_B")
STRATEGIES: dict[str, type["Strategy"]] = {}


def register(cls: type["Strategy"]) -> type["Strategy"]:
    """Class decorator: make a strategy available by its lowercase `name`."""
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy(config: "FederatedLoraConfig") -> "Strategy":
    """The strategy object the config names."""
    return STRATEGIES[config.strategy](config)


class ModuleAggregator(ABC):
    """Streaming aggregation of one LoRA module: accept factors one client at a time, then a result."""

    def __init__(self, strategy: "Strategy", state: GlobalState, module: str) -> None:
        self.strategy, self.module = strategy, module
        self.A0, self.B0 = state.factor(module, "lora_A"), state.factor(module, "lora_B")

    @abstractmethod
    def accept(self, A: Optional[Tensor], B: Optional[Tensor], weight: float) -> None:
        """Fold in one client's factors (None for a factor the client did not upload). A and B may be
        views of read buffers that are reused afterwards: keep copies, never the tensors themselves."""

    @abstractmethod
    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        """The next global (A, B), and this round's change of the frozen base as U @ V (scaled by s), or None."""


class FedAvgModule(ModuleAggregator):
    """Weighted average of each uploaded factor; a factor nobody uploaded (frozen) keeps its global value."""

    def __init__(self, strategy: "Strategy", state: GlobalState, module: str) -> None:
        super().__init__(strategy, state, module)
        self.mean_A, self.mean_B = WeightedMean(), WeightedMean()

    def accept(self, A: Optional[Tensor], B: Optional[Tensor], weight: float) -> None:
        if A is not None:
            self.mean_A.add(A, weight)
        if B is not None:
            self.mean_B.add(B, weight)

    def averaged(self) -> tuple[Tensor, Tensor]:
        A = self.mean_A.value(self.A0.dtype) if self.mean_A.mean is not None else self.A0
        B = self.mean_B.value(self.B0.dtype) if self.mean_B.mean is not None else self.B0
        return A, B

    def result(self) -> tuple[Tensor, Tensor, Optional[LowRank]]:
        return (*self.averaged(), None)


class Aggregator:
    """One round on the server: validate and fold in updates one at a time, then the next global state."""

    def __init__(self, strategy: "Strategy", state: GlobalState, threads: Optional[int] = None) -> None:
        self.strategy, self.state = strategy, state
        self.threads = threads or min(4, os.cpu_count() or 1)  # workers of `accept_files`
        self.clients: dict[str, dict] = {}
        self._layouts: dict[int, dict] = {}
        self._reset()

    def _reset(self) -> None:
        self.modules = {m: self.strategy.module_aggregator_cls(self.strategy, self.state, m) for m in self.state.modules()}
        self._noised = False
        self.extras = {k: WeightedMean() for k in self.strategy.shared_extra_keys(self.state)}

    def check(self, update: dict[str, Tensor], client_id: str) -> int:
        """Validate an update without folding it in; its rank. Raises `InvalidUpdateError`.

        An update whose names, dtypes and shapes are exactly those expected at one of its allowed
        ranks (the common case, compared as one dict) only has its values checked; any other goes
        through `check_update`, which says precisely what is wrong."""
        s = self.strategy
        ranks = s.allowed_ranks(self.state, client_id)
        layout = {k: (v.dtype, tuple(v.shape)) for k, v in update.items() if isinstance(v, (Tensor, TensorSpec))}
        rank = next((r for r in ranks if self._expected(r) == layout), None)
        if rank is not None and all(isinstance(v, TensorSpec) or all_finite(v) for v in update.values()):
            return rank
        return check_update(update, self.state, trainable=s.shared_factors(self.state.round), ranks=ranks, client_id=client_id,
                            extras=s.shared_extra_keys(self.state), personal=s.personal_keys(self.state))

    def _expected(self, rank: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The name -> (dtype, shape) of a valid update at `rank` (computed once per rank)."""
        if rank not in self._layouts:
            trainable, out = self.strategy.shared_factors(self.state.round), {}
            for key in self.strategy.shared_extra_keys(self.state):
                out[key] = (self.state.tensors[key].dtype, tuple(self.state.tensors[key].shape))
            for module in self.state.modules():
                A, B = self.state.factor(module, "lora_A"), self.state.factor(module, "lora_B")
                if "lora_A" in trainable:
                    out[lora_key(module, "lora_A")] = (A.dtype, (rank, A.shape[1]))
                if "lora_B" in trainable:
                    out[lora_key(module, "lora_B")] = (B.dtype, (B.shape[0], rank))
            self._layouts[rank] = out
        return self._layouts[rank]

    def accept(self, update: dict[str, Tensor], num_samples: int, client_id: str, norm: Optional[float] = None) -> None:
        """Validate one client's update and fold it in. A rejected update changes nothing.

        With `max_update_norm`, an update whose change is larger is refused, or clipped to that norm
        with `clip_updates`. `norm`: the update's `change_norm`, if the caller already measured it."""
        self._check_new(client_id, num_samples)
        s, bound = self.strategy, self.strategy.config.max_update_norm
        rank = self.check(update, client_id)
        start = s.client_start(self.state, client_id, rank) if bound is not None else None
        if start is not None and norm is None:
            norm = change_norm(update, start)
        clipped = bound is not None and norm > bound
        if (error := self._refuse_norm(client_id, norm)) is not None:
            raise error
        if clipped:
            update = clip_change(update, start, norm, bound)
        weight = s.weight(num_samples)
        for module, agg in self.modules.items():
            agg.accept(update.get(lora_key(module, "lora_A")), update.get(lora_key(module, "lora_B")), weight)
        for key, mean in self.extras.items():
            mean.add(update[key], weight)
        self.clients[client_id] = {"num_samples": num_samples, "weight": weight, "rank": rank, "norm": norm, "clipped": clipped}

    def _check_new(self, client_id: str, num_samples: int) -> None:
        if client_id in self.clients:
            raise ValueError(f"Client {client_id!r} already contributed to round {self.state.round}; an update counts once.")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"Client {client_id!r}: num_samples must be a positive integer, got {num_samples!r}.")

    def _refuse_norm(self, client_id: str, norm: float) -> Optional[InvalidUpdateError]:
        """The refusal of a change-norm above `max_update_norm` (None when it passes or is clipped)."""
        bound = self.strategy.config.max_update_norm
        if bound is None or norm <= bound or self.strategy.config.clip_updates:
            return None
        return InvalidUpdateError(
            client_id, self.state.round,
            f"its change has L2 norm {norm:.4g}, above max_update_norm={bound:.4g}. Lower the client's learning "
            "rate or local steps, or raise the bound (or set clip_updates=True).",
        )

    # ---- many files at once, piece by piece --------------------------------------------------------
    def open_files(self, files: Sequence[tuple[str, "str | os.PathLike", int]]) -> tuple[list[FileUpdate], dict[str, Exception]]:
        """Open (client_id, path, num_samples) update files and check what their headers say (names,
        ranks, shapes, dtypes) without reading any value: the valid ones, and the refused with why."""
        opened, refused = [], {}
        for client_id, path, num_samples in files:
            try:
                if any(f.client_id == client_id for f in opened):
                    raise ValueError(f"Client {client_id!r} is listed twice for round {self.state.round}; an update counts once.")
                self._check_new(client_id, num_samples)
                file = UpdateFile(path, client_id, self.state.round)
            except (InvalidUpdateError, ValueError, OSError) as err:
                refused[client_id] = err
                continue
            try:
                rank = self.check(file.specs, client_id)
            except InvalidUpdateError as err:
                file.close()
                refused[client_id] = err
                continue
            opened.append(FileUpdate(client_id, file, num_samples, rank, self.strategy.weight(num_samples)))
        return opened, refused

    def measure_files(self, updates: list[FileUpdate]) -> dict[str, Exception]:
        """Read every value of each opened update once, client by client: refuse non-finite values and
        record each update's change-norm (`FileUpdate.norm`). Memory: one update's start tensors."""
        refused = {}
        for u in updates:
            start = self.strategy.client_start(self.state, u.client_id, u.rank)
            try:
                total = sum(squared_change(u.read(key), start[key]) for key in u.file.specs)
            except InvalidUpdateError as err:
                refused[u.client_id] = err
                continue
            u.norm, u.checked = total**0.5, True
        return refused

    def accept_files(self, files: Sequence[tuple[str, "str | os.PathLike", int]]) -> dict[str, Exception]:
        """Fold in several clients' update files at once; the refused clients and why (nothing of theirs
        is folded in, nothing is raised for them).

        The result is bit for bit that of `accept` on each file in turn, but the work goes piece by
        piece (`_fold`: runs of tensors for a plain mean, else modules): each piece's running
        aggregate stays in the CPU cache while every client's copy of that piece is read from its
        file (`UpdateFile`), so the files stream through memory about once and resident memory
        stays near one adapter. Values are checked as they are folded in; a client whose values turn out
        non-finite is dropped and the fold restarts without it, so it leaves no trace (a first,
        client-by-client pass checks them instead when `max_update_norm` needs the norms first, or
        when this aggregator already holds updates).
        """
        updates, refused = self.open_files(files)
        try:
            return {**refused, **self.accept_opened(updates)}
        finally:
            for u in updates:
                u.file.close()

    def accept_opened(self, updates: list[FileUpdate]) -> dict[str, Exception]:
        """`accept_files` for updates already opened (and perhaps measured) with `open_files`."""
        refused: dict[str, Exception] = {}
        bound = self.strategy.config.max_update_norm
        if (bound is not None or self.clients) and not all(u.checked for u in updates):
            refused.update(self.measure_files([u for u in updates if not u.checked]))
        live = []
        for u in updates:
            error = refused.get(u.client_id) or (self._refuse_norm(u.client_id, u.norm) if u.checked else None)
            if error is None:
                live.append(u)
            else:
                refused[u.client_id] = error
        while live:
            try:
                self._fold(live)
                break
            except InvalidUpdateError as err:  # only before any update was accepted: start again without it
                refused[err.client_id] = err
                live = [u for u in live if u.client_id != err.client_id]
                self._reset()
        for u in live:
            clipped = bound is not None and u.norm > bound
            self.clients[u.client_id] = {"num_samples": u.num_samples, "weight": u.weight, "rank": u.rank,
                                         "norm": u.norm, "clipped": clipped}
        return refused

    def _fold(self, updates: list[FileUpdate]) -> None:
        """Fold every update in, in `threads` workers (`fold.in_workers`): a plain weighted mean of files
        laid out alike by runs of bytes (`fold.fold_runs`), anything else module by module
        (`fold.fold_modules`, clipping the updates above `max_update_norm` where it clips)."""
        runs = self._mean_runs(updates)
        if runs is not None:
            return fold.in_workers(partial(fold.fold_runs, updates), runs, self.threads)
        bound = self.strategy.config.max_update_norm
        clip = {u.client_id: self.strategy.client_start(self.state, u.client_id, u.rank)
                for u in updates if bound is not None and u.norm > bound}
        tasks = [*self.modules.items(), *self.extras.items()]
        fold.in_workers(partial(fold.fold_modules, updates, clip=clip, bound=bound), tasks, self.threads)

    def _mean_runs(self, updates: list[FileUpdate]) -> Optional[list[fold.MeanRun]]:
        """The runs of `fold.plan_runs` where the round is a plain weighted mean: every module aggregates
        by `FedAvgModule.accept`, no update is clipped and nothing was folded in before; else None."""
        bound = self.strategy.config.max_update_norm
        if (not updates or self.clients or any(type(agg).accept is not FedAvgModule.accept for agg in self.modules.values())
                or any(bound is not None and u.norm > bound for u in updates)):
            return None
        means = dict(self.extras)
        for module, agg in self.modules.items():
            means[lora_key(module, "lora_A")], means[lora_key(module, "lora_B")] = agg.mean_A, agg.mean_B
        return fold.plan_runs(updates, means)

    def result(self) -> GlobalState:
        """The next global state: round + 1, aggregated factors, the base change folded into base_delta.

        Under DP (`config.dp`) the means are noised first (`privacy.noise_round`, once), and a round
        with no update is the noise alone."""
        if self.strategy.config.dp:
            if not self._noised:
                privacy.noise_round(self)
                self._noised = True
        elif not self.clients:
            raise ValueError(f"Round {self.state.round}: no client update was accepted; nothing to aggregate.")
        tensors, base_delta = dict(self.state.tensors), dict(self.state.base_delta)
        for module, agg in self.modules.items():
            A, B, delta = agg.result()
            tensors[lora_key(module, "lora_A")], tensors[lora_key(module, "lora_B")] = A, B
            if delta is not None:
                previous = base_delta.get(module)
                merged = previous.concat(delta) if previous is not None else delta
                base_delta[module] = merged.compressed().to(A.dtype)
        for key, mean in self.extras.items():
            tensors[key] = mean.value(self.state.tensors[key].dtype)
        return GlobalState(
            round=self.state.round + 1,
            tensors=tensors,
            base_delta=base_delta,
            strategy_state=self.strategy.next_strategy_state(self.state, self.clients),
        )


@dataclass
class ClientRound:
    """One client's local round on a PeftModel, set up by a strategy: train, then take `payload()`."""

    strategy: "Strategy"
    model: "PeftModel"
    state: GlobalState
    client_id: str
    rank: int
    trainable: tuple[str, ...]
    hooks: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def round(self) -> int:
        return self.state.round

    def regularizer(self) -> Optional[Tensor]:
        """A term the strategy adds to the training loss (HetLoRA), or None."""
        return self.strategy.regularizer(self)

    def payload(self) -> dict[str, Tensor]:
        """Exactly the tensors this client uploads: the trained factors at its rank, and extra tensors,
        but for those the strategy keeps personal (`personal`)."""
        self.close()
        tensors = adapter.read_tensors(self.model)
        rank = self.strategy.upload_rank(self)
        shared = self.strategy.shared_factors(self.round)
        out = {}
        for key in self.strategy.shared_extra_keys(self.state):
            out[key] = tensors[key]
        for module in lora_modules(tensors):
            if "lora_A" in shared:
                out[lora_key(module, "lora_A")] = tensors[lora_key(module, "lora_A")][:rank].contiguous()
            if "lora_B" in shared:
                out[lora_key(module, "lora_B")] = tensors[lora_key(module, "lora_B")][:, :rank].contiguous()
        return out

    def personal(self) -> dict[str, Tensor]:
        """The tensors this client keeps for its next round and never uploads (`Strategy.personal_keys`),
        as the model holds them now (factors at the model's rank); {} for a strategy without any."""
        if not self.strategy.personalized:
            return {}
        tensors = adapter.read_tensors(self.model)
        return {key: tensors[key].contiguous() for key in self.strategy.personal_keys(self.state)}

    def close(self) -> None:
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


class Strategy:
    """One federated LoRA algorithm, client and server side. Subclasses set `name` and override hooks."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    exact: ClassVar[bool] = False
    # Why the strategy cannot run under client-level DP (None: it can). DP-FedAvg noises the means of the
    # uploaded factors (`peft_federated.privacy`); a strategy whose result is more than a post-processing
    # of those means (data-dependent weights, products of clients' factors) has no sensitivity to
    # calibrate to.
    dp_refusal: ClassVar[Optional[str]] = None
    module_aggregator_cls: ClassVar[type[ModuleAggregator]] = FedAvgModule
    # Personalization: the LoRA factors each client trains but keeps (never uploaded, never aggregated),
    # and whether the extra trainable tensors (modules_to_save: a classification head) are personal too.
    # A client keeps its own between rounds (`peft_federated.personal`); published rounds keep round 0's
    # values there (B = 0, the initial head). Nothing is personal but under FedSA-LoRA.
    personal_factors: ClassVar[tuple[str, ...]] = ()
    personal_extras: ClassVar[bool] = False

    def __init__(self, config: "FederatedLoraConfig") -> None:
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}(r={self.config.r}, lora_alpha={self.config.lora_alpha})"

    # ---- shared -------------------------------------------------------------------------------
    def initial_state(self, model: "PeftModel") -> GlobalState:
        """Round 0: lora_A drawn from `init_seed` (the same on every party), lora_B = 0, the model's extras.

        Only the factors' shapes are read, so `model` may hold them on the meta device (the aggregator's
        `skeleton.skeleton_model`); extra tensors need values."""
        tensors = adapter.read_tensors(model)
        for module in lora_modules(tensors):
            a, b = lora_key(module, "lora_A"), lora_key(module, "lora_B")
            tensors[a] = adapter.init_lora_A(tuple(tensors[a].shape), self.config.init_seed, module, dtype=tensors[a].dtype)
            tensors[b] = torch.zeros(tensors[b].shape, dtype=tensors[b].dtype)
        empty = [k for k, v in tensors.items() if v.is_meta]
        if empty:
            raise ValueError(f"Round 0 needs the values of {empty[:3]}, which the model holds on the meta device: load them, "
                             "or draw them from the federation's seed (peft_federated.skeleton.draw_modules_to_save).")
        return GlobalState(round=0, tensors=tensors, strategy_state=self.initial_strategy_state())

    def initial_strategy_state(self) -> dict:
        return {}

    @property
    def personalized(self) -> bool:
        """Whether each client keeps tensors of its own (`personal_factors`, `personal_extras`)."""
        return bool(self.personal_factors or self.personal_extras)

    def personal_keys(self, state: GlobalState) -> list[str]:
        """The tensors of `state` that stay on each client, in the state's order."""
        extras = set(state.extra_keys()) if self.personal_extras else set()
        return [k for k in state.tensors if k in extras or ((p := parse_lora_key(k)) is not None and p[1] in self.personal_factors)]

    def shared_factors(self, round: int) -> tuple[str, ...]:
        """The LoRA factors clients upload this round, and the server aggregates: the trained ones that are not personal."""
        return tuple(f for f in self.trainable_factors(round) if f not in self.personal_factors)

    def shared_extra_keys(self, state: GlobalState) -> list[str]:
        """The extra trainable tensors clients upload and the server averages (none when they are personal)."""
        return [] if self.personal_extras else state.extra_keys()

    def weight(self, num_samples: int) -> float:
        """A client's aggregation weight before normalisation: its sample count, or 1 when uniform."""
        return float(num_samples) if self.config.weighting == "samples" else 1.0

    # ---- client side --------------------------------------------------------------------------
    def trainable_factors(self, round: int) -> tuple[str, ...]:
        """Which LoRA factors clients train in this round (they upload those that are not personal)."""
        return BOTH

    def client_rank(self, state: GlobalState, client_id: str) -> int:
        """The rank a client trains at this round."""
        return self.config.r

    def allowed_ranks(self, state: GlobalState, client_id: str) -> range:
        """Ranks the server accepts in this client's update."""
        rank = self.client_rank(state, client_id)
        return range(rank, rank + 1)

    def client_start(self, state: GlobalState, client_id: str, rank: int) -> dict[str, Tensor]:
        """The tensors a client starts its round from: the global factors truncated to its rank."""
        out = dict(state.tensors)
        for module in state.modules():
            a, b = lora_key(module, "lora_A"), lora_key(module, "lora_B")
            out[a], out[b] = out[a][:rank], out[b][:, :rank]
        return out

    def prepare_client(self, model: "PeftModel", state: GlobalState, client_id: str,
                       personal: Optional[dict[str, Tensor]] = None) -> ClientRound:
        """Load the global state into `model` for this client's round: base change, start tensors,
        which factors train, and (below the model's rank) gradient masks on the unused ranks.

        `personal`: the client's own tensors (`personal_keys`, as `ClientRound.personal` gave them at the
        end of its last round) written over the global ones; None, for a client that has none yet (its
        first round, or it joins late), starts from the published round's values: B = 0, the round-0 head."""
        model_rank = adapter.model_rank(model)
        if model_rank != self.config.r:
            raise ValueError(f"The model's LoRA rank is {model_rank} but the federation's r is {self.config.r}.")
        if abs(adapter.model_scale(model) - self.config.scaling) > 1e-12 * self.config.scaling:
            raise ValueError(
                f"The model's LoRA scale {adapter.model_scale(model)} differs from the federation's "
                f"{self.config.scaling}: build the model with the federation's config.to_lora_config()."
            )
        rank = self.client_rank(state, client_id)
        adapter.set_base_delta(model, state.base_delta, self.config.scaling)
        adapter.write_tensors(model, self.client_start(state, client_id, rank))
        if personal:
            if (wrong := sorted(set(personal) ^ set(self.personal_keys(state)))):
                raise ValueError(f"{self.name}: the personal tensors given are not this federation's personal part "
                                 f"(Strategy.personal_keys); these differ: {wrong[:3]}{' ...' if len(wrong) > 3 else ''}.")
            adapter.write_tensors(model, personal)
        trainable = self.trainable_factors(state.round)
        adapter.set_factor_trainable(model, trainable)
        hooks = adapter.mask_rank(model, rank) if rank < model_rank else []
        client_round = ClientRound(self, model, state, client_id, rank, trainable, hooks)
        self.on_client_start(client_round)
        return client_round

    def on_client_start(self, client_round: ClientRound) -> None:
        """Record what the strategy needs at the end of the round (HetLoRA's tail norm)."""

    def regularizer(self, client_round: ClientRound) -> Optional[Tensor]:
        return None

    def upload_rank(self, client_round: ClientRound) -> int:
        """The rank of the uploaded factors (HetLoRA may prune it)."""
        return client_round.rank

    # ---- server side --------------------------------------------------------------------------
    def aggregator(self, state: GlobalState, threads: Optional[int] = None) -> Aggregator:
        """A fresh streaming aggregator for the round `state.round` (`threads`: workers of `accept_files`,
        default min(4, CPU count))."""
        return Aggregator(self, state, threads)

    def aggregate(self, state: GlobalState, updates: list[tuple[str, dict[str, Tensor], int]]) -> GlobalState:
        """Convenience: aggregate (client_id, update, num_samples) triples in one call."""
        agg = self.aggregator(state)
        for client_id, update, num_samples in updates:
            agg.accept(update, num_samples, client_id)
        return agg.result()

    def next_strategy_state(self, state: GlobalState, clients: dict[str, dict]) -> dict:
        """The strategy state after a round, given what each accepted client reported."""
        return dict(state.strategy_state)

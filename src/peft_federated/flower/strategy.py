"""Our strategies as a Flower `Strategy` (Message API): Flower drives the rounds, our aggregator runs them.

Each Flower round is `aggregator.aggregate_round` on that round's train replies, seen as a store's
submitted updates (`_Replies`). So a Flower run checks, refuses and folds exactly as the store
aggregator does, with nothing re-implemented: registered clients, size limits, the update schema
(sample counts, metrics), copies of another client's bytes, the strategy's checks (names, shapes,
ranks, dtypes, finite values), `max_update_norm`, `norm_outlier_factor`, `max_client_share`, and
whatever `Aggregator` and `aggregate_round` add (DP). A refused reply leaves the round going on:
its reason is in the round's `refused` metadata (`FederatedLoraStrategy.history`, and federation.json
when a store publishes; under DP only counted there, the reason logged), its count in the round's
Flower metrics. Under DP every Flower round publishes a round, one that sampled no client (or
accepted none) as the noise alone, as `run_simulation` does. Flower's own FedAvg checks that every
reply holds identical keys, which our payloads do not (HetLoRA's ranks, RoLoRA's single factor), so
the Strategy methods are implemented here directly.

Clients are sampled as `run_simulation` samples them (`round_clients`: `sample_clients` over client
ids, seeded by (seed, round); under DP each registered client with probability q, as the accountant
assumes), so the same data, seeds and sampling give the same global adapter. A node's client id
is what its ClientApp answers to a "query.client_id" message, asked once per node.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Optional

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from peft_federated.aggregator import MAX_REASON, aggregate_round, initialize
from peft_federated.config import FederatedLoraConfig
from peft_federated.flower.records import (
    CLIENT_ID, CLIENT_ID_ACTION, FEDERATION, config_to_json, from_arrays, read_reply, reply_size, round_content, to_arrays,
)
from peft_federated.hub_integration.store import (
    LocalStore, RoundStore, check_client_id, check_update_size, update_record,
)
from peft_federated.hub_integration.update_meta import too_large
from peft_federated.state import GlobalState, from_peft_adapter, to_peft_adapter
from peft_federated.strategies import get_strategy
from peft_federated.trainer.simulation import round_clients

QUERY_CLIENT_ID = f"{MessageType.QUERY}.{CLIENT_ID_ACTION}"


class FederatedLoraStrategy(Strategy):
    """Any peft-federated strategy, by name or by config, as a Flower Strategy.

    `FederatedLoraStrategy(config)` or `FederatedLoraStrategy("fedex", r=8, lora_alpha=16, target_modules=[...])`.
    `store`: a `RoundStore` (or a folder for a `LocalStore`) that gets every round as the store
    aggregator publishes it (plain PEFT adapter, federation.json, model card); None keeps rounds in memory.
    `clients`: the registered client ids (others are neither sampled nor accepted); None accepts any.
    `seed`: the client sampling seed (`run_simulation`'s). `min_available_nodes`: nodes to wait for
    before a round samples (default: the registered clients, else 1). `timeout`: seconds to wait for the nodes'
    client ids (train replies: `start(timeout=...)`).
    """

    def __init__(self, config: FederatedLoraConfig | str, *, store: RoundStore | str | Path | None = None,
                 clients: Optional[Iterable[str]] = None, seed: int = 0, min_available_nodes: Optional[int] = None,
                 timeout: float = 3600.0, **config_fields: Any) -> None:
        if isinstance(config, str):
            config = FederatedLoraConfig(strategy=config, **config_fields)
        elif config_fields:
            raise TypeError(f"Give a FederatedLoraConfig or a strategy name with its fields, not both: {sorted(config_fields)}.")
        self.config, self.strategy = config, get_strategy(config)
        self.store = LocalStore(store) if isinstance(store, (str, Path)) else store
        self.clients = None if clients is None else sorted({check_client_id(c) for c in clients})
        self.seed, self.timeout = seed, timeout
        self.min_available_nodes = min_available_nodes or (len(self.clients) if self.clients else 1)
        self.state: Optional[GlobalState] = None
        self.history: list[dict[str, Any]] = []  # each round this run published: its federation.json metadata
        self.nodes: dict[int, str] = {}  # node id -> the client id its ClientApp answered
        self._sent: dict[int, str] = {}  # this round's sampled nodes
        self._config_json = config_to_json(config)

    def __repr__(self) -> str:
        return f"FederatedLoraStrategy({self.strategy!r}, strategy={self.config.strategy!r})"

    # ---- the global state -------------------------------------------------------------------------
    def initial_arrays(self, model=None) -> ArrayRecord:
        """Round 0 for `start`: the store's round 0 if it holds one, else drawn from `init_seed` for
        `model` (a PeftModel of the federation's config; a meta-device skeleton will do,
        `peft_federated.skeleton.skeleton_model`) and published to the store."""
        latest = self.store.latest_round() if self.store is not None else None
        if latest:
            raise ValueError(f"{self.store!r} already holds rounds up to {latest}; a Flower run starts from round 0: "
                             "give it a new store folder (or repo).")
        if latest is None and model is None:
            raise ValueError("Round 0 is drawn for the federation's model: pass initial_arrays(model), a PeftModel built "
                             "from config.to_lora_config() (peft_federated.skeleton.skeleton_model needs no weights).")
        if self.store is None:
            self.state = self.strategy.initial_state(model)
        else:
            initialize(self.store, self.config, model)
            self.state, _ = self.store.read_round(0)
        self.history = []
        return self.arrays()

    def arrays(self) -> ArrayRecord:
        """The current global round as Flower arrays: its published PEFT adapter (base change included)."""
        return to_arrays(to_peft_adapter(self.state, self.config.r)[0])

    def load_global(self, model) -> None:
        """Load the current global round into `model` (a PeftModel of the federation), e.g. in `evaluate_fn`."""
        self.strategy.prepare_client(model, self.state, "global").close()

    def start(self, grid: Grid, initial_arrays: Optional[ArrayRecord] = None, num_rounds: Optional[int] = None,
              **kwargs: Any) -> Result:
        """Flower's `Strategy.start`; by default from `initial_arrays()` already drawn, for `config.num_rounds`
        (the rounds the learning-rate schedule spans)."""
        if initial_arrays is None:
            if self.state is None:
                raise ValueError("Call initial_arrays(model) first, or pass initial_arrays.")
            initial_arrays = self.arrays()
        return super().start(grid, initial_arrays, num_rounds or self.config.num_rounds, **kwargs)

    def _state(self, arrays: ArrayRecord) -> GlobalState:
        if self.state is None:  # started from arrays alone: they are round 0's published adapter
            tensors, delta = from_peft_adapter(from_arrays(arrays), self.config.r)
            self.state = GlobalState(0, tensors, delta, self.strategy.initial_strategy_state())
        return self.state

    # ---- Flower's Strategy ------------------------------------------------------------------------
    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> %s (%s), r=%d, lora_alpha=%s, target_modules=%s", c.strategy, self.strategy.paper or "-",
            c.r, c.lora_alpha, sorted(c.target_modules) if c.target_modules else None)
        log(INFO, "\t├──> clients per round: %s, local steps: %s, seed %d", c.clients_per_round, c.local_steps, self.seed)
        log(INFO, "\t└──> store: %r, registered clients: %s", self.store, self.clients or "any")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Sample this round's clients as `run_simulation` does and send each the global round."""
        state = self._state(arrays)
        ids = self._client_ids(grid)
        sampled = round_clients(self.config, ids, self.seed, server_round - 1) if ids else []
        node_of = {c: n for n, c in self.nodes.items() if c in sampled}
        self._sent = {node_of[c]: c for c in sampled}
        log(INFO, "configure_train: global round %d to %d of %d clients: %s", state.round, len(sampled), len(ids), sampled)
        content = round_content(state, self.config, self._config_json)
        config["server-round"] = server_round
        content["config"] = config
        return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
                for node in self._sent]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[Optional[ArrayRecord], MetricRecord]:
        """`aggregate_round` on the replies: the next global round's arrays (without DP, None when no
        update was accepted: the round is not published and the next Flower round trains it again) and
        its metrics."""
        got: dict[str, Message] = {}
        for msg in replies:
            client_id = self._sent.get(msg.metadata.src_node_id)
            if client_id is None or client_id in got:
                log(WARNING, "aggregate_train: ignored a reply from node %d, which was not sent this round", msg.metadata.src_node_id)
                continue
            got[client_id] = msg
        missing = sorted(set(self._sent.values()) - set(got))
        if missing:
            log(WARNING, "aggregate_train: no reply within the timeout from %s", missing)
        view = _Replies(self, got)
        try:
            published = aggregate_round(view, self.config, self.clients, sampled=True)
        finally:
            view.close()
        metrics: dict[str, Any] = {"round": self.state.round, "accepted": 0, "refused": len(got), "missing": len(missing)}
        if published is None:
            log(WARNING, "aggregate_train: no update accepted; global round %d is not published (the reasons are logged "
                "above) and the next Flower round trains it again", self.state.round + 1)
            return None, MetricRecord(metrics)
        if view.published is None:
            raise RuntimeError(f"Round {published} was already in {self.store!r}, published by another aggregator: a "
                               "Flower run needs a store of its own.")
        self.state, meta = view.published, view.metadata
        self.history.append(meta)
        for refusal in meta.get("refused", []):
            log(WARNING, "round %d refused %s: %s", self.state.round, refusal["client_id"], refusal["reason"])
        # each reply is accepted or refused (under DP neither is named: refusals are counted, and logged by aggregate_round)
        refused = meta.get("refused_count", len(meta.get("refused", [])))
        metrics.update(round=self.state.round, accepted=len(got) - refused, refused=refused)
        metrics.update({k: v for k, v in meta.get("metrics", {}).items() if isinstance(v, (int, float))})
        return self.arrays(), MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """No federated evaluation: evaluate centrally with `start(evaluate_fn=...)` and `load_global`."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Optional[MetricRecord]:
        return None

    # ---- nodes ------------------------------------------------------------------------------------
    def _client_ids(self, grid: Grid) -> list[str]:
        """The client ids this round may sample: each connected node's answer to "query.client_id" (asked
        once per node), leaving out nodes that did not answer a valid id, ids claimed by several nodes
        (which one is honest cannot be told) and ids not registered."""
        while len(nodes := list(grid.get_node_ids())) < self.min_available_nodes:
            log(INFO, "Waiting for nodes to connect: %d connected (minimum required: %d).", len(nodes), self.min_available_nodes)
            time.sleep(1)
        new = [n for n in nodes if n not in self.nodes]
        if new:
            content = RecordDict({FEDERATION: ConfigRecord({"config": self._config_json})})
            asked = [Message(content, dst_node_id=n, message_type=QUERY_CLIENT_ID) for n in new]
            for reply in grid.send_and_receive(asked, timeout=self.timeout):
                try:
                    self.nodes[reply.metadata.src_node_id] = _answered_id(reply)
                except ValueError as err:
                    log(WARNING, "node %d is not sampled: %s", reply.metadata.src_node_id, err)
        claims = Counter(self.nodes[n] for n in nodes if n in self.nodes)
        ids = []
        for client_id, count in sorted(claims.items()):
            if count > 1:
                log(WARNING, "client id %r is claimed by %d nodes; none of them is sampled", client_id, count)
            elif self.clients is not None and client_id not in self.clients:
                log(WARNING, "client id %r is not registered (clients=...); it is not sampled", client_id)
            else:
                ids.append(client_id)
        return ids


def _answered_id(reply: Message) -> str:
    if reply.has_error():
        raise ValueError(f"its ClientApp failed to answer its client id ({str(reply.error.reason)[:MAX_REASON]})")
    record = reply.content.config_records.get(FEDERATION)
    client_id = record.get(CLIENT_ID) if record is not None else None
    return check_client_id(client_id)


class _Replies(RoundStore):
    """One Flower round's train replies seen as a store's submitted updates, for `aggregate_round`:
    each reply is read (`records.read_reply`) and written as the update file a store client would
    have submitted; what `aggregate_round` publishes goes on to the strategy's store."""

    def __init__(self, owner: FederatedLoraStrategy, replies: dict[str, Message]) -> None:
        self.owner, self.replies = owner, replies
        self.folder = tempfile.TemporaryDirectory(prefix="peft-federated-flower-")
        self.published: Optional[GlobalState] = None
        self.metadata: dict[str, Any] = {}

    def close(self) -> None:
        self.folder.cleanup()

    def latest_round(self) -> Optional[int]:
        return self.owner.state.round

    def read_round(self, round: Optional[int] = None) -> tuple[GlobalState, dict[str, Any]]:
        return self.owner.state, {}

    def history(self) -> list[dict[str, Any]]:
        return list(self.owner.history)

    def list_updates(self, round: int) -> list[str]:
        return sorted(self.replies)

    def submit_update(self, round: int, client_id: str, tensors, meta: dict[str, Any]) -> str:
        raise NotImplementedError("Flower clients reply to the round's messages; nothing is submitted to this view.")

    def update_file(self, round: int, client_id: str, max_bytes: Optional[int] = None,
                    max_meta_bytes: Optional[int] = None) -> tuple[Path, dict[str, Any]]:
        msg = self.replies[client_id]
        if msg.has_error():
            raise ValueError(f"Update of {client_id!r} for round {round}: its ClientApp failed "
                             f"({str(msg.error.reason)[:MAX_REASON]}); nothing was received.")
        check_update_size(reply_size(msg.content), max_bytes, round, client_id)
        try:
            payload, fields = read_reply(msg.content)
        except ValueError as err:
            raise ValueError(f"Update of {client_id!r} for round {round} is unreadable: {err}. A client replies with "
                             "peft_federated.flower's records (its ClientApp does).") from None
        data, meta = update_record(round, client_id, payload, fields)
        if max_meta_bytes is not None and (size := len(json.dumps(meta, default=repr))) > max_meta_bytes:
            raise too_large(size, max_meta_bytes, round, client_id)
        path = Path(self.folder.name) / f"{client_id}.safetensors"
        path.write_bytes(data)
        return path, meta

    def publish_round(self, state: GlobalState, config: FederatedLoraConfig, metadata: dict[str, Any]) -> str:
        where = self.owner.store.publish_round(state, config, metadata) if self.owner.store is not None else ""
        self.published, self.metadata = state, {"round": state.round, **metadata}
        return where

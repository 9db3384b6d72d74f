"""The aggregator role: wait for a round's updates in a store, validate, aggregate, publish.

Works with any `RoundStore`. A round is published once its quorum of clients submitted, or at the
deadline with whatever valid updates arrived (at least `min_clients`). A refused update is
reported in the round's metadata with its reason; the others are kept.
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from peft_federated.config import FederatedLoraConfig
from peft_federated.hub_integration.store import RoundAlreadyPublishedError, RoundStore
from peft_federated.strategies import InvalidUpdateError, get_strategy

logger = logging.getLogger(__name__)
FETCH_THREADS = 8  # update files fetched (downloaded, sha256-checked) at a time


def aggregate_round(
    store: RoundStore, config: FederatedLoraConfig, clients: Optional[list[str]] = None
) -> Optional[int]:
    """Aggregate the updates submitted for the round after the latest published one and publish it.

    `clients`: the registered clients (others' updates are refused); None accepts any client.
    Each update is refused, with its reason in the round's `refused` metadata, when: its client is
    not registered; its file is above `max_update_bytes` (unread); it does not match its sha256; it
    was trained from another round or base commit; it fails the strategy's checks (names, shapes,
    ranks, dtypes, finite values, `max_update_norm`); its bytes repeat an earlier client's update (an
    update counts once); or, with `norm_outlier_factor` and at least 3 valid updates, its change-norm is
    above that factor times the round's median norm. The files are fetched and checked against their
    sha256 in threads (`fetch_update_files`), then aggregated together (`Aggregator.accept_opened`); the
    norms, where a setting needs them, come from a first pass that reads each update and keeps only
    its norm. Memory stays near one update.
    Accepted updates are listed in `contributions` with their sha256 (anyone can re-verify the round)
    and their change-norm where a norm setting had it measured (else null: no extra pass is paid for it).
    Returns the published round, or None when no valid update was there.
    """
    strategy = get_strategy(config)
    state, _ = store.read_round()
    refused: list[dict] = []
    submitted = []
    for client_id in store.list_updates(state.round):
        if clients is None or client_id in clients:
            submitted.append(client_id)
        else:
            refused.append({"client_id": client_id, "reason": "not a registered client of this federation"})

    def refuse(client_id: str, err: Exception) -> None:
        refused.append({"client_id": client_id, "reason": str(err)})
        logger.warning("%s", err)

    files, metas, first_of = [], {}, {}
    for client_id, got in fetch_update_files(store, state.round, submitted, config.max_update_bytes):
        try:
            if isinstance(got, Exception):
                raise got
            path, meta = got
            if meta.get("client_id") != client_id or meta.get("round") != state.round:
                raise InvalidUpdateError(client_id, state.round, f"its update.json is for client {meta.get('client_id')!r}, "
                                         f"round {meta.get('round')!r}: a client submits only its own update, in that round's folder")
            if meta.get("base_round") != state.round:
                raise InvalidUpdateError(client_id, state.round, f"it was trained from round {meta.get('base_round')}; "
                                         f"the client must train from round {state.round}")
            if meta.get("sha256") in first_of:
                raise ValueError(f"Update of {client_id!r} for round {state.round} is byte for byte the update of "
                                 f"{first_of[meta['sha256']]!r}: an update counts once.")
        except (InvalidUpdateError, ValueError) as err:
            refuse(client_id, err)
            continue
        first_of[meta["sha256"]] = client_id
        files.append((client_id, path, meta.get("num_samples")))
        metas[client_id] = meta

    aggregator = strategy.aggregator(state)
    opened, bad = aggregator.open_files(files)
    updates = opened
    try:
        outliers = config.norm_outlier_factor is not None and len(updates) >= 3
        if outliers or config.max_update_norm is not None:  # the norms are needed before anything is folded in
            bad |= aggregator.measure_files(updates)
            updates = [u for u in updates if u.client_id not in bad]
        if outliers and len(updates) >= 3:
            bound = config.norm_outlier_factor * statistics.median(u.norm for u in updates)
            for u in updates:
                if u.norm > bound:
                    bad[u.client_id] = InvalidUpdateError(u.client_id, state.round, (
                        f"its change has L2 norm {u.norm:.4g}, above norm_outlier_factor={config.norm_outlier_factor:g} x the "
                        f"round's median norm ({bound / config.norm_outlier_factor:.4g}). Check the client's data and "
                        "learning rate, or raise norm_outlier_factor."))
            updates = [u for u in updates if u.client_id not in bad]
        bad |= aggregator.accept_opened(updates)
    finally:
        for u in opened:
            u.file.close()
    for client_id, _, _ in files:
        if client_id in bad:
            refuse(client_id, bad[client_id])
    contributions = [{k: metas[c].get(k) for k in ("client_id", "num_samples", "sha256", "metrics")} | {"norm": info["norm"]}
                     for c, info in aggregator.clients.items()]
    if not contributions:
        return None
    new = aggregator.result()
    metrics = _mean_metrics([c.get("metrics") or {} for c in contributions])
    try:
        store.publish_round(new, config, {"contributions": contributions, "refused": refused, "metrics": metrics})
    except RoundAlreadyPublishedError:
        logger.info("round %d was published by another aggregator", new.round)
    return new.round


def fetch_update_files(
    store: RoundStore, round: int, client_ids: list[str], max_bytes: Optional[int] = None
) -> list[tuple[str, "tuple[Path, dict] | Exception"]]:
    """(client_id, `store.update_file(...)`: a local path checked against its sha256, and the update's
    metadata) for each client, or the error that refuses its update; `FETCH_THREADS` at a time, so
    downloads and sha256 checks overlap."""
    def fetch(client_id: str):
        try:
            return store.update_file(round, client_id, max_bytes=max_bytes)
        except (InvalidUpdateError, ValueError) as err:
            return err

    with ThreadPoolExecutor(max(1, min(FETCH_THREADS, len(client_ids)))) as pool:
        return list(zip(client_ids, pool.map(fetch, client_ids)))


def serve(
    store: RoundStore,
    config: FederatedLoraConfig,
    clients: Optional[list[str]] = None,
    quorum: Optional[int] = None,
    deadline: float = 600.0,
    min_clients: int = 1,
    poll_interval: float = 1.0,
) -> None:
    """Aggregate every round until `config.num_rounds` are published.

    A round is aggregated as soon as `quorum` updates (default: all registered clients, else 1)
    are in, or after `deadline` seconds with at least `min_clients`.
    """
    quorum = quorum or (len(clients) if clients else 1)
    while (store.latest_round() or 0) < config.num_rounds:
        round = store.latest_round() or 0
        started = time.monotonic()
        while True:
            submitted = [c for c in store.list_updates(round) if clients is None or c in clients]
            waited = time.monotonic() - started
            if len(submitted) >= quorum or (waited >= deadline and len(submitted) >= min_clients):
                break
            time.sleep(poll_interval)
        if aggregate_round(store, config, clients) is None:
            time.sleep(poll_interval)


def _mean_metrics(metrics: list[dict]) -> dict[str, float]:
    keys = {k for m in metrics for k, v in m.items() if isinstance(v, (int, float))}
    return {f"clients_mean_{k}": sum(m[k] for m in metrics if k in m) / sum(k in m for m in metrics) for k in sorted(keys)}


def initialize(store: RoundStore, config: FederatedLoraConfig, model) -> int:
    """Publish round 0 (the initial global adapter, derived from `init_seed`) unless the store has rounds."""
    latest = store.latest_round()
    if latest is not None:
        return latest
    state = get_strategy(config).initial_state(model)
    try:
        store.publish_round(state, config, {"contributions": [], "metrics": {}})
    except RoundAlreadyPublishedError:
        pass
    return 0

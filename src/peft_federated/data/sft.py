"""A language-model client's training data, in the formats TRL's `SFTTrainer` trains on.

- plain text: a `text` column (the loss on every token);
- prompt/completion: `prompt` and `completion` columns (the loss on the completion only, TRL's default);
- conversational: a `messages` column of `{"role", "content"}` turns, rendered with the tokenizer's
  chat template (in a CSV file: each cell one JSON list); `prompt`/`completion` may also be turns;
- already tokenized: an `input_ids` column (and optionally `labels`, -100 where no loss), used as is.

The format is read off the columns (messages, then prompt/completion, then text), or named with
`text_column`, `messages_column`, `prompt_column`/`completion_column`. Everything that can be
checked before training is checked here, with an error that says what to change (`SFTDataError`);
`FederatedSFTTrainer` checks what is only known after tokenization (sequences left without a label).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from datasets import Dataset

FORMATS = ("text", "prompt_completion", "messages", "tokenized")
_OPTIONS = {"text": "--text-column", "messages": "--messages-column", "prompt": "--prompt-column",
            "completion": "--completion-column"}


class SFTDataError(ValueError):
    """A client's language-model data cannot train: what is wrong and what to change."""


@dataclass(frozen=True)
class SFTFormat:
    """A dataset's SFT format and which of its columns hold TRL's fields (`columns`: TRL name -> column)."""

    kind: str
    columns: dict[str, str] = field(default_factory=dict)


def check_not_empty(data: "Dataset", source: str = "the data") -> None:
    """Refuse a client dataset without rows (`SFTDataError`)."""
    if len(data) == 0:
        raise SFTDataError(f"{source} has no rows: this client has nothing to train on. Give it a non-empty dataset.")


def read_dataset(path: str | Path) -> "Dataset":
    """A folder saved with `save_to_disk` (of a DatasetDict: its "train" split), or a .json/.jsonl/.csv file."""
    from datasets import Dataset, DatasetDict, load_from_disk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a dataset folder saved with save_to_disk, or a .json, .jsonl or .csv file.")
    if path.is_dir():
        data = load_from_disk(str(path))
        if isinstance(data, DatasetDict):
            if "train" not in data:
                raise ValueError(f"{path} holds a DatasetDict without a 'train' split (splits: {list(data)}).")
            data = data["train"]
        return data
    if path.suffix in (".json", ".jsonl"):
        return Dataset.from_json(str(path)) if path.stat().st_size else Dataset.from_dict({})
    if path.suffix == ".csv":
        return Dataset.from_csv(str(path)) if path.stat().st_size else Dataset.from_dict({})
    raise ValueError(f"{path}: give a dataset folder saved with save_to_disk, or a .json, .jsonl or .csv file.")


def detect_format(columns: list[str], text_column: Optional[str] = None, messages_column: Optional[str] = None,
                  prompt_column: Optional[str] = None, completion_column: Optional[str] = None,
                  source: str = "the data") -> SFTFormat:
    """The SFT format of a dataset with `columns`: the one named by the overrides, else read off the columns."""
    given = {"text": text_column, "messages": messages_column, "prompt": prompt_column, "completion": completion_column}
    for name, column in given.items():
        if column is not None and column not in columns:
            raise SFTDataError(f"{source} has no column {column!r} ({_OPTIONS[name]}); its columns: {columns}.")
    if sum(x is not None for x in (text_column, messages_column, prompt_column or completion_column)) > 1:
        raise SFTDataError(f"{source}: name one format: --text-column, --messages-column, or --prompt-column with --completion-column.")
    if messages_column is not None:
        return SFTFormat("messages", {"messages": messages_column})
    if prompt_column is not None or completion_column is not None:
        prompt, completion = prompt_column or "prompt", completion_column or "completion"
        missing = [c for c in (prompt, completion) if c not in columns]
        if missing:
            raise SFTDataError(f"{source} has no column {missing[0]!r} for prompt/completion data; its columns: {columns}. "
                               "Name both with --prompt-column and --completion-column.")
        return SFTFormat("prompt_completion", {"prompt": prompt, "completion": completion})
    if text_column is not None:
        return SFTFormat("text", {"text": text_column})
    if "input_ids" in columns:
        return SFTFormat("tokenized", {c: c for c in ("input_ids", "labels") if c in columns})
    for name in ("messages", "conversations"):
        if name in columns:
            return SFTFormat("messages", {"messages": name})
    if "prompt" in columns and "completion" in columns:
        return SFTFormat("prompt_completion", {"prompt": "prompt", "completion": "completion"})
    if "prompt" in columns or "completion" in columns:
        have, lack = ("prompt", "completion") if "prompt" in columns else ("completion", "prompt")
        raise SFTDataError(f"{source} has a {have!r} column but no {lack!r} column (columns: {columns}): prompt/completion "
                           f"data needs both; name yours with --prompt-column and --completion-column.")
    if "text" in columns:
        return SFTFormat("text", {"text": "text"})
    raise SFTDataError(
        f"{source} has none of the columns a language-model client trains on (its columns: {columns}): 'text' (plain "
        "text), 'prompt' and 'completion', 'messages' (chat turns) or 'input_ids' (tokenized). Name yours with "
        "--text-column, --prompt-column and --completion-column, or --messages-column.")


def _is_turns(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, dict) and "role" in t and "content" in t for t in value)


def _from_value(turns: list) -> list:
    """ShareGPT turns ({"from", "value"}) as {"role", "content"} turns."""
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles.get(t["from"], t["from"]), "content": t["value"]} if isinstance(t, dict) and "from" in t else t
            for t in turns]


def prepare_sft_data(data: "Dataset", tokenizer=None, text_column: Optional[str] = None, messages_column: Optional[str] = None,
                     prompt_column: Optional[str] = None, completion_column: Optional[str] = None,
                     source: str = "the data") -> tuple["Dataset", SFTFormat]:
    """`data` with TRL's column names for its format (other columns dropped), checked row by row.

    Refused (`SFTDataError`): no rows; no columns of a format; empty or missing values; chat turns
    that are not lists of {"role", "content"}; conversational data with a tokenizer without a chat template.
    """
    from datasets import Dataset

    check_not_empty(data, source)
    fmt = detect_format(data.column_names, text_column, messages_column, prompt_column, completion_column, source)
    data = data.select_columns(list(fmt.columns.values()))
    data = data.rename_columns({col: name for name, col in fmt.columns.items() if col != name})
    if fmt.kind == "tokenized":
        for i, ids in enumerate(data["input_ids"]):
            if not ids:
                raise SFTDataError(f"{source}: row {i} has an empty input_ids; drop it or tokenize it again.")
        return data, fmt
    if fmt.kind == "messages":
        original = list(data["messages"])
        turns = []
        for i, t in enumerate(original):
            if isinstance(t, str):  # a CSV cell holds the turns as JSON
                try:
                    t = json.loads(t)
                except json.JSONDecodeError as e:
                    raise SFTDataError(f"{source}: row {i} of {fmt.columns['messages']!r} is text that is not JSON ({e}); "
                                       "each cell must be a JSON list of {\"role\": ..., \"content\": ...} turns.") from None
            t = _from_value(t) if isinstance(t, list) else t
            if not _is_turns(t):
                raise SFTDataError(f"{source}: row {i} of {fmt.columns['messages']!r} is not a list of "
                                   f"{{\"role\": ..., \"content\": ...}} turns (got {str(t)[:80]!r}).")
            turns.append(t)
        if turns != original:
            data = Dataset.from_dict({"messages": turns})  # the only column left
    else:
        for name in fmt.columns:
            for i, value in enumerate(data[name]):
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise SFTDataError(f"{source}: row {i} has no {fmt.columns[name]!r}; drop the row or fill it in.")
                if not isinstance(value, str) and not _is_turns(value):
                    raise SFTDataError(f"{source}: row {i} of {fmt.columns[name]!r} is neither text nor chat turns (got {type(value).__name__}).")
    conversational = fmt.kind == "messages" or _is_turns(data[0].get("prompt"))
    if conversational and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise SFTDataError(
            f"{source} holds chat turns, but the base model's tokenizer has no chat template to render them. Use a "
            "model whose tokenizer has one, give one (tokenizer.chat_template, or --chat-template FILE.jinja), or "
            "convert the data to 'text' or 'prompt'/'completion' strings.")
    return data, fmt


__all__ = ["FORMATS", "SFTDataError", "SFTFormat", "check_not_empty", "detect_format", "prepare_sft_data", "read_dataset"]

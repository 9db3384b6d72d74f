"""The schema of a client's update.json: parsed strictly, checked field by field, nothing else kept.

    round          int, the round the update is for          client_id    str, the submitting client
    base_round     int, the round it was trained from         base_commit  40 hex digits on the Hub, else null
    num_samples    int in [1, max_num_samples]                sha256       64 lowercase hex digits
    metrics        object: at most MAX_METRICS names (METRIC_NAME), each a finite number of magnitude
                   at most MAX_METRIC_ABS (optional; {} when absent)

Anything a client writes is hostile until checked: the file is refused above its size limit (before
it is read), when it is not strict JSON (NaN/Infinity, nesting too deep for the parser, integers too
long), not an object, or when any field is unknown, missing or out of its range. Every refusal is a
ValueError that names the client, the round and what the client must change.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

MAX_METRICS = 32
MAX_METRIC_ABS = 1e300  # metrics are informational: finite, and a mean of up to 10**8 of them stays finite
METRIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
FIELDS = ("round", "client_id", "base_round", "base_commit", "num_samples", "metrics", "sha256")


def _refuse(client_id: str, round: int, what: str) -> ValueError:
    return ValueError(f"update.json of {client_id!r} for round {round} {what}; the client must resubmit its update "
                      "as the federation's client writes it.")


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number in strict JSON")


def parse_update_json(data: bytes, round: int, client_id: str, max_bytes: Optional[int] = None) -> dict[str, Any]:
    """A client's update.json as a dict, refused (ValueError) unless it is a strict JSON object within `max_bytes`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise too_large(len(data), max_bytes, round, client_id)
    try:
        meta = json.loads(data, parse_constant=_no_constant)
    except RecursionError:
        raise _refuse(client_id, round, "is nested too deeply to parse") from None
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError, NaN/Infinity, integers too long
        raise _refuse(client_id, round, f"is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise _refuse(client_id, round, f"must be a JSON object, got {type(meta).__name__}")
    return meta


def too_large(size: int, max_bytes: int, round: int, client_id: str) -> ValueError:
    return ValueError(f"update.json of {client_id!r} for round {round} is {size} bytes, above max_update_json_bytes="
                      f"{max_bytes}: refused unread. It holds only the update's round, ids, sample count, sha256 and "
                      f"at most {MAX_METRICS} metrics; the client must resubmit it without the rest.")


def _int(meta: dict, key: str, client_id: str, round: int, low: int, high: Optional[int] = None) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"an integer in [{low}, {high}]" if high is not None else "a positive integer" if low == 1 else f"an integer >= {low}"
        raise _refuse(client_id, round, f"has {key}={_short(value)}: {key} must be {bound}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value) if not isinstance(value, int) or isinstance(value, bool) or abs(value) < 10**limit else f"<{len(str(abs(value)))}-digit integer>"
    return text if len(text) <= limit else text[:limit] + "..."


def check_update_meta(meta: dict[str, Any], round: int, client_id: str, max_num_samples: int) -> dict[str, Any]:
    """The checked record (only the schema's fields; metrics as floats), or ValueError saying what to fix.

    A `num_samples` above `max_num_samples` is refused: the sample count is the client's own claim and
    sets its weight, so the federation bounds it."""
    unknown = sorted(str(k) for k in meta if k not in FIELDS)
    if unknown:
        raise _refuse(client_id, round, f"has unknown fields {_short(unknown)} (allowed: {', '.join(FIELDS)})")
    if not isinstance(meta.get("client_id"), str):
        raise _refuse(client_id, round, f"has client_id={_short(meta.get('client_id'))}: it must be the client's id")
    _int(meta, "round", client_id, round, 0)
    _int(meta, "base_round", client_id, round, -(2**31))
    samples = meta.get("num_samples")
    if isinstance(samples, int) and not isinstance(samples, bool) and samples > max_num_samples:
        raise ValueError(f"Update of {client_id!r} for round {round} claims num_samples={_short(samples)}, above "
                         f"max_num_samples={max_num_samples}: refused. The client must report its true number of "
                         "training examples (or the federation raises max_num_samples).")
    _int(meta, "num_samples", client_id, round, 1)
    sha = meta.get("sha256")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise _refuse(client_id, round, f"has sha256={_short(sha)}: it must be 64 lowercase hex digits")
    commit = meta.get("base_commit")
    if commit is not None and (not isinstance(commit, str) or not _COMMIT.fullmatch(commit)):
        raise _refuse(client_id, round, f"has base_commit={_short(commit)}: it must be a 40-hex-digit commit id or null")
    return {**{k: meta[k] for k in FIELDS if k in meta and k != "metrics"},
            "metrics": check_metrics(meta.get("metrics", {}), round, client_id)}


def check_metrics(metrics: Any, round: int, client_id: str) -> dict[str, float]:
    """A client's metrics: a bounded set of safe names, each a finite, bounded number."""
    if not isinstance(metrics, dict):
        raise _refuse(client_id, round, f"has metrics of type {type(metrics).__name__}: it must be an object of numbers")
    if len(metrics) > MAX_METRICS:
        raise _refuse(client_id, round, f"has {len(metrics)} metrics, above the {MAX_METRICS} allowed")
    out = {}
    for name, value in metrics.items():
        if not METRIC_NAME.fullmatch(name):
            raise _refuse(client_id, round, f"has a metric named {_short(name)}: a name is 1-64 letters, digits, "
                          "'_', '.', '/' or '-', starting with a letter or digit")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse(client_id, round, f"has metric {name}={_short(value)}: a metric is a number")
        if isinstance(value, int) and abs(value) > MAX_METRIC_ABS:
            raise _refuse(client_id, round, f"has metric {name}={_short(value)}: its magnitude must be at most {MAX_METRIC_ABS:g}")
        value = float(value)
        if not math.isfinite(value) or abs(value) > MAX_METRIC_ABS:
            raise _refuse(client_id, round, f"has metric {name}={value!r}: a metric is finite, of magnitude at most "
                          f"{MAX_METRIC_ABS:g}")
        out[name] = value
    return out

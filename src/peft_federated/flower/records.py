"""What travels in Flower messages, both ways, and how a hostile reply is read.

Server to client (a train or query message):
    "arrays"      ArrayRecord: the global round as its published PEFT adapter (`state.to_peft_adapter`:
                  the trained factors, the base change as extra ranks), the bytes `PeftModel.from_pretrained` loads
    "federation"  ConfigRecord: "round", "strategy-state" (JSON) and "config" (the federation's
                  `FederatedLoraConfig` as JSON), so a client always trains with the server's settings
Client to server (the reply to "query.client_id": ConfigRecord "federation" with "client-id"; a train reply):
    "arrays"      ArrayRecord: exactly the strategy's payload (`ClientRound.payload`)
    "metrics"     MetricRecord: "num-examples" (int, Flower's key) and the Trainer's metrics
    "federation"  ConfigRecord: "round", the round the update was trained from

Tensors travel as Flower's numpy arrays (.npy bytes, never unpickled); a dtype numpy lacks (bfloat16) as its raw
bytes (`RAW`). Reading a reply (`read_reply`) refuses, with a ValueError saying what to fix, anything
that is not exactly this: other records, a non-integer sample count, an undecodable array.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import threading
from typing import Any

import numpy as np
from numpy.lib import format as npy
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from peft_federated.config import FederatedLoraConfig
from peft_federated.state import GlobalState, from_peft_adapter, to_peft_adapter

_HEADER_LOCK = threading.Lock()  # see `_tensor`: one .npy header parsed at a time

ARRAYS, METRICS, FEDERATION = "arrays", "metrics", "federation"
NUM_EXAMPLES = "num-examples"
CLIENT_ID_ACTION, CLIENT_ID = "client_id", "client-id"  # the "query.client_id" message, and its reply's key
NUMPY = "numpy.ndarray"  # Flower's stype for np.save bytes
RAW = "torch.raw"  # a tensor's bytes as laid out in memory (little-endian), for dtypes numpy has no type for
_RAW_DTYPES = {"bfloat16": torch.bfloat16}
_NUMPY_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what an adapter can hold


def to_arrays(tensors: dict[str, Tensor]) -> ArrayRecord:
    """Tensors as an ArrayRecord, in their order and dtype."""
    record = ArrayRecord()
    for key, value in tensors.items():
        value = value.detach().cpu().contiguous()
        if value.dtype in _RAW_DTYPES.values():
            name = next(n for n, d in _RAW_DTYPES.items() if d == value.dtype)
            record[key] = Array(dtype=name, shape=tuple(value.shape), stype=RAW, data=value.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            record[key] = Array(value)
    return record


def from_arrays(record: ArrayRecord) -> dict[str, Tensor]:
    """An ArrayRecord's tensors; ValueError naming the array that cannot be a tensor, and why."""
    out = {}
    for key, array in record.items():
        try:
            out[key] = _tensor(array)
        except ValueError as err:
            raise ValueError(f"array {str(key)[:100]!r} {err}") from None
    return out


def _tensor(array: Array) -> Tensor:
    if array.stype == RAW:
        dtype = _RAW_DTYPES.get(array.dtype)
        shape = tuple(array.shape)
        if dtype is None:
            raise ValueError(f"has raw dtype {str(array.dtype)[:40]!r}; raw bytes are only for {', '.join(_RAW_DTYPES)}")
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise ValueError(f"has shape {shape!r}, not a tuple of sizes")
        expected = math.prod(shape) * dtype.itemsize
        if len(array.data) != expected:
            raise ValueError(f"holds {len(array.data)} bytes, not the {expected} of a {dtype} tensor of shape {shape}")
        return torch.frombuffer(bytearray(array.data), dtype=dtype).reshape(shape) if expected else torch.zeros(shape, dtype=dtype)
    if array.stype != NUMPY:
        raise ValueError(f"has serialization {str(array.stype)[:40]!r}; send {NUMPY} (Flower's Array(tensor))")
    # The .npy header is read and checked against the bytes before any value is: no pickle, no allocation
    # larger than what was received.
    data, buffer = array.data, io.BytesIO(array.data)
    try:
        version = npy.read_magic(buffer)
        read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}[version]
        with _HEADER_LOCK:  # numpy parses the header with ast.literal_eval, which CPython 3.11 breaks across threads
            shape, fortran, dtype = read_header(buffer)
    except Exception as err:  # not .npy bytes, a pickle, a truncated or malformed header, another format version
        raise ValueError(f"is not a numpy array's bytes ({type(err).__name__}: {str(err)[:200]})") from None
    if dtype.kind not in _NUMPY_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"has dtype {str(dtype)[:60]}, not a number type a tensor holds")
    count, offset = math.prod(shape), buffer.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"holds {len(data) - offset} bytes of values, not the {count * dtype.itemsize} of its header's "
                         f"shape {shape} and dtype {dtype}")
    value = np.frombuffer(data, dtype, count, offset) if count else np.empty(0, dtype)
    value = value.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="), order="C")
    try:
        return torch.from_numpy(value)
    except TypeError as err:  # a numpy type torch has no counterpart for
        raise ValueError(f"has dtype {value.dtype}, which torch cannot hold ({err})") from None


def config_to_json(config: FederatedLoraConfig) -> str:
    """The federation's config as JSON: the plain LoRA fields and the federation fields."""
    lora = config.to_lora_config().to_dict()
    return json.dumps({"lora": lora, "federation": config.federation_dict()}, default=_plain, sort_keys=True)


def config_from_json(text: str) -> FederatedLoraConfig:
    """The `FederatedLoraConfig` that `config_to_json` wrote (LoRA fields this PEFT does not know are dropped)."""
    from peft import LoraConfig

    data = json.loads(text)
    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    lora = {k: v for k, v in data["lora"].items() if k in names}
    lora.update(inference_mode=False, rank_pattern={}, alpha_pattern={})
    return FederatedLoraConfig(**lora, **data["federation"])


def _plain(value: Any):
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def round_content(state: GlobalState, config: FederatedLoraConfig, config_json: str | None = None) -> RecordDict:
    """The message content that gives a client the global round `state` and the federation's config."""
    tensors, _ = to_peft_adapter(state, config.r)
    federation = ConfigRecord({"round": state.round, "strategy-state": json.dumps(state.strategy_state, sort_keys=True),
                               "config": config_json or config_to_json(config)})
    return RecordDict({ARRAYS: to_arrays(tensors), FEDERATION: federation})


def read_round(content: RecordDict) -> tuple[GlobalState, FederatedLoraConfig]:
    """The global state and the federation's config that `round_content` sent."""
    config = read_config(content)
    federation = content.config_records[FEDERATION]
    tensors, base_delta = from_peft_adapter(from_arrays(content.array_records[ARRAYS]), config.r)
    state = GlobalState(int(federation["round"]), tensors, base_delta, json.loads(str(federation["strategy-state"])))
    return state, config


def read_config(content: RecordDict) -> FederatedLoraConfig:
    """The federation's config a server message carries."""
    if FEDERATION not in content.config_records or "config" not in content.config_records[FEDERATION]:
        raise ValueError(f"The message has no {FEDERATION!r} ConfigRecord with the federation's config: it was not sent "
                         "by peft_federated.flower's strategy (FederatedLoraStrategy).")
    return config_from_json(str(content.config_records[FEDERATION]["config"]))


def reply_content(payload: dict[str, Tensor], num_samples: int, metrics: dict[str, float], round: int) -> RecordDict:
    """A client's train reply: its payload, sample count and metrics, and the round it trained from."""
    return RecordDict({ARRAYS: to_arrays(payload), METRICS: MetricRecord({NUM_EXAMPLES: int(num_samples), **metrics}),
                       FEDERATION: ConfigRecord({"round": int(round)})})


def reply_size(content: RecordDict) -> int:
    """The bytes of every array a reply carries (read before any is decoded)."""
    return sum(len(a.data) for record in content.array_records.values() for a in record.values())


def read_reply(content: RecordDict) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(payload, the update's fields: base_round, num_samples, metrics) of a train reply, or a ValueError
    saying what is wrong with it. Values are checked as an update.json's are (`update_meta`) afterwards."""
    kinds = {ARRAYS: ("ArrayRecord", content.array_records), METRICS: ("MetricRecord", content.metric_records),
             FEDERATION: ("ConfigRecord", content.config_records)}
    for key, (kind, records) in kinds.items():
        if set(records) != {key}:
            found = sorted(str(k)[:40] for k in records)
            raise ValueError(f"its reply must hold one {kind} named {key!r} (and no other), found {found[:5]}")
    metrics = dict(content.metric_records[METRICS])
    base_round = content.config_records[FEDERATION].get("round")
    fields = {"base_round": base_round, "num_samples": metrics.pop(NUM_EXAMPLES, None), "metrics": metrics}
    return from_arrays(content.array_records[ARRAYS]), fields

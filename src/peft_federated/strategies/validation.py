"""Update validation, shared by every strategy: names, ranks, shapes, dtypes and finite values."""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Optional

import torch
from torch import Tensor

from peft_federated.state import GlobalState, lora_key, parse_lora_key
from peft_federated.update_file import TensorSpec


class InvalidUpdateError(ValueError):
    """A client's update that the server refuses; nothing from it is aggregated."""

    def __init__(self, client_id: str, round: int, reason: str) -> None:
        self.client_id, self.round, self.reason = client_id, round, reason
        super().__init__(f"Update from client {client_id!r} for round {round} refused: {reason}")


def check_update(
    update: dict[str, Tensor | TensorSpec], state: GlobalState, trainable: tuple[str, ...], ranks: range, client_id: str,
    extras: Optional[Sequence[str]] = None, personal: Collection[str] = (),
) -> int:
    """Raise `InvalidUpdateError` unless `update` holds exactly the expected tensors; return its rank.

    Expected: the `trainable` factors of every LoRA module (one common rank within `ranks`) and the
    `extras` (default: every extra trainable tensor of the global state), with the global dtypes and
    shapes, all finite. A `personal` tensor (one each client keeps) is refused as such.
    For an update file's header (`TensorSpec` values) everything but the values is checked.
    """

    def refuse(reason: str) -> InvalidUpdateError:
        return InvalidUpdateError(client_id, state.round, reason)

    extras = state.extra_keys() if extras is None else extras
    expected = set(extras)
    for module in state.modules():
        expected.update(lora_key(module, f) for f in trainable)
    uploads = ", ".join(trainable) + (" and the extra trainable tensors" if extras else "")
    held = sorted(set(update) & set(personal))
    if held:
        raise refuse(f"it holds personal tensors {held[:3]}{' ...' if len(held) > 3 else ''}: under this strategy each "
                     f"client keeps them for itself and never uploads them. Upload only {uploads}.")
    unknown, missing = sorted(set(update) - expected), sorted(expected - set(update))
    if unknown:
        raise refuse(f"unexpected tensors {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: this round uploads only "
                     f"{uploads}. Is the client on the right round?")
    if missing:
        raise refuse(f"missing tensors {missing[:3]}{' ...' if len(missing) > 3 else ''}; upload the whole payload.")

    rank = None
    for key, value in update.items():
        if not isinstance(value, (Tensor, TensorSpec)):
            raise refuse(f"{key} is a {type(value).__name__}, not a tensor.")
        reference = state.tensors[key]
        if value.dtype != reference.dtype:
            raise refuse(f"{key} has dtype {value.dtype}; the federation uses {reference.dtype}.")
        parsed = parse_lora_key(key)
        if parsed is None:
            expected_shape = tuple(reference.shape)
        else:
            _, factor = parsed
            this_rank = value.shape[0] if factor == "lora_A" else (value.shape[1] if value.dim() == 2 else -1)
            if value.dim() != 2 or this_rank not in ranks:
                raise refuse(
                    f"{key} has shape {tuple(value.shape)}: its rank must be in [{ranks.start}, {ranks.stop - 1}] "
                    f"for this client."
                )
            if rank is not None and this_rank != rank:
                raise refuse(f"{key} has rank {this_rank} but other factors have rank {rank}; use one rank.")
            rank = this_rank
            d_out, d_in = state.factor(parsed[0], "lora_B").shape[0], state.factor(parsed[0], "lora_A").shape[1]
            expected_shape = (rank, d_in) if factor == "lora_A" else (d_out, rank)
        if tuple(value.shape) != expected_shape:
            raise refuse(f"{key} has shape {tuple(value.shape)}, expected {expected_shape}.")
        if isinstance(value, Tensor) and not all_finite(value):
            raise refuse(f"{key} holds NaN or Inf values.")
    return rank if rank is not None else ranks.start


def change_norm(update: dict[str, Tensor], start: dict[str, Tensor]) -> float:
    """L2 norm of an update's change from the tensors the client started from, all tensors together."""
    return sum(squared_change(value, start[key]) for key, value in update.items()) ** 0.5


def squared_change(value: Tensor, start: Tensor) -> float:
    """Squared L2 norm of one tensor's change, in float64 (`change_norm` sums it over an update)."""
    return float(torch.sum((value.double() - start.double()) ** 2))


def clip_change(update: dict[str, Tensor], start: dict[str, Tensor], norm: float, bound: float) -> dict[str, Tensor]:
    """The update whose change from `start` is scaled from `norm` down to `bound`."""
    factor = bound / norm
    return {k: (start[k].double() + (v.double() - start[k].double()) * factor).to(v.dtype) for k, v in update.items()}


def all_finite(x: Tensor) -> bool:
    """Whether every value of `x` is finite. A finite sum proves it in one cheap pass (a NaN or Inf
    anywhere makes the sum NaN or Inf); only a non-finite sum, which may be an overflow of finite
    values, needs the element-wise check."""
    return math.isfinite(x.sum().item()) or bool(torch.isfinite(x).all())

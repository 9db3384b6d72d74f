"""The federation's global state and its one published form: a plain PEFT adapter.

Tensor names are PEFT's own `adapter_model.safetensors` keys (`base_model.model.<module>.lora_A.weight`).
Exact methods (FedEx-LoRA's residual, FLoRA's merge) change the frozen base: that change is kept as
low-rank factors `s * U @ V` per module (`LowRank`), never as a dense matrix. It is published by
appending the factors to the adapter's own: `lora_A = [A; V]`, `lora_B = [B, U]`, with a per-module
`rank_pattern`/`alpha_pattern` that keeps the scale s. So plain `PeftModel.from_pretrained` at a
round's revision loads exactly the federation's global model of that round, and a client splits the
first r ranks (what it trains) from the rest (its frozen base change).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

LORA_FACTORS = ("lora_A", "lora_B")
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<factor>lora_A|lora_B)\.weight$")


def lora_key(module: str, factor: str) -> str:
    """The PEFT state-dict key of one factor of a module."""
    return f"{PEFT_PREFIX}{module}.{factor}.weight"


def parse_lora_key(key: str) -> tuple[str, str] | None:
    """(module, factor) for a LoRA key, None for any other key (a `modules_to_save` tensor, say)."""
    match = _KEY.match(key)
    return (match["module"], match["factor"]) if match else None


def lora_modules(tensors: dict[str, Tensor]) -> list[str]:
    """Names of the modules that carry a LoRA pair, in the order their lora_A keys appear."""
    return [parsed[0] for key in tensors if (parsed := parse_lora_key(key)) and parsed[1] == "lora_A"]


@dataclass
class LowRank:
    """A d_out x d_in matrix kept as factors U (d_out x q) @ V (q x d_in)."""

    U: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    def dense(self) -> Tensor:
        return self.U @ self.V

    def concat(self, other: "LowRank") -> "LowRank":
        """The sum of two low-rank matrices, by stacking their factors."""
        dtype = torch.promote_types(self.U.dtype, other.U.dtype)
        return LowRank(torch.cat([self.U.to(dtype), other.U.to(dtype)], 1), torch.cat([self.V.to(dtype), other.V.to(dtype)], 0))

    def to(self, dtype: torch.dtype) -> "LowRank":
        return LowRank(self.U.to(dtype), self.V.to(dtype))

    def compressed(self, computed_in: torch.dtype | None = None) -> "LowRank":
        """The same matrix with the fewest factors: drops only singular values at rounding level.

        QR of both factors, then an SVD of the small q x q core, in float64: exact up to rounding,
        and the rank never exceeds min(d_out, d_in). `computed_in`: the dtype some factors were
        rounded to (a mean rounded to float32, then widened): that rounding adds directions of its own,
        with singular values below eps(computed_in) * ||U|| ||V||, which float64's level would keep.
        """
        if self.rank == 0:
            return self
        left, s, right = self.svd(computed_in)
        root = s.sqrt()
        return LowRank((left * root).to(self.U.dtype), (root[:, None] * right).to(self.U.dtype))

    def svd(self, computed_in: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The thin SVD left @ diag(s) @ right of the matrix, in float64, singular values descending:
        left (d_out x k) and right (k x d_in) have orthonormal columns and rows. Only the k singular
        values above rounding level are kept (`compressed` says which; k = 0 for a zero matrix)."""
        q1, r1 = torch.linalg.qr(self.U.double())
        q2, r2 = torch.linalg.qr(self.V.double().T)
        p, s, zt = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
        # Relative to ||U|| ||V||, not to the largest singular value: a sum that cancels (FedEx's
        # residual of identical clients) must come out as rank 0, not as amplified rounding noise.
        size = torch.linalg.norm(self.U.double()) * torch.linalg.norm(self.V.double())
        tol = 16 * torch.finfo(torch.float64).eps * max(self.U.shape[0], self.V.shape[1], self.rank) * size
        if computed_in is not None:
            tol = max(tol, torch.finfo(computed_in).eps * size)
        keep = int((s > tol).sum())
        return q1 @ p[:, :keep], s[:keep], zt[:keep] @ q2.T


@dataclass
class GlobalState:
    """Everything a client needs to start a round, and everything a round publishes.

    round: rounds completed so far (0 before the first); tensors: the global adapter at rank r (plus
    any `modules_to_save` tensors); base_delta: per module, the change of the frozen base as
    `scale * U @ V`; strategy_state: the strategy's own JSON-serialisable state (HetLoRA's ranks).
    """

    round: int
    tensors: dict[str, Tensor]
    base_delta: dict[str, LowRank] = field(default_factory=dict)
    strategy_state: dict = field(default_factory=dict)

    def modules(self) -> list[str]:
        return lora_modules(self.tensors)

    def factor(self, module: str, factor: str) -> Tensor:
        return self.tensors[lora_key(module, factor)]

    def extra_keys(self) -> list[str]:
        """Trainable tensors that are not LoRA factors (e.g. a classification head)."""
        return [k for k in self.tensors if parse_lora_key(k) is None]


def to_peft_adapter(state: GlobalState, rank: int) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The published adapter tensors, and the rank of every module whose base changed.

    Modules with a base change get the delta's factors appended after the r trained ranks.
    """
    tensors = {k: v.contiguous() for k, v in state.tensors.items()}
    ranks = {}
    for module, delta in state.base_delta.items():
        if delta.rank == 0:
            continue
        a, b = lora_key(module, "lora_A"), lora_key(module, "lora_B")
        tensors[a] = torch.cat([tensors[a], delta.V.to(tensors[a].dtype)], 0).contiguous()
        tensors[b] = torch.cat([tensors[b], delta.U.to(tensors[b].dtype)], 1).contiguous()
        ranks[module] = rank + delta.rank
    return tensors, ranks


def from_peft_adapter(tensors: dict[str, Tensor], rank: int) -> tuple[dict[str, Tensor], dict[str, LowRank]]:
    """Split a published adapter into the rank-r trained factors and the per-module base change."""
    out = dict(tensors)
    delta = {}
    for module in lora_modules(tensors):
        a, b = lora_key(module, "lora_A"), lora_key(module, "lora_B")
        A, B = tensors[a], tensors[b]
        if A.shape[0] != B.shape[1]:
            raise ValueError(f"{module}: lora_A has rank {A.shape[0]} but lora_B has rank {B.shape[1]}.")
        if A.shape[0] < rank:
            raise ValueError(f"{module}: published rank {A.shape[0]} is below the federation's rank r={rank}.")
        out[a], out[b] = A[:rank].contiguous(), B[:, :rank].contiguous()
        if A.shape[0] > rank:
            delta[module] = LowRank(B[:, rank:].contiguous(), A[rank:].contiguous())
    return out, delta

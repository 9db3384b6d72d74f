"""Stacked low-rank sums, shared by FLoRA and FedEx-LoRA: sum_k w_k B_k A_k kept as factors."""

from __future__ import annotations

import torch
from torch import Tensor

from peft_federated.state import LowRank


class WeightedStack:
    """Running [w_1 B_1 ... w_K B_K] and [A_1; ...; A_K] / sum w_k, i.e. the weighted mean of B_k A_k.

    The stack is recompressed (exactly) once its rank passes min(d_out, d_in), so memory stays
    bounded by about two dense matrices however many clients contribute.
    """

    def __init__(self) -> None:
        self.stack: LowRank | None = None
        self.total = 0.0

    def add(self, B: Tensor, A: Tensor, weight: float) -> None:
        term = LowRank(B.to(torch.float64, copy=True), A.double() * weight)  # a copy: B may be a reused buffer
        self.stack = term if self.stack is None else self.stack.concat(term)
        self.total += weight
        if self.stack.rank > min(self.stack.U.shape[0], self.stack.V.shape[1]):
            self.stack = self.stack.compressed()

    def mean(self) -> LowRank:
        if self.stack is None:
            raise ValueError("No update was accepted.")
        return LowRank(self.stack.U, self.stack.V / self.total)

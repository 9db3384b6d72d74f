"""SVD factors of a low-rank matrix at the adapter's rank, shared by FlexLoRA and FedSVD."""

from __future__ import annotations

import torch
from torch import Tensor

from peft_federated.state import LowRank


def svd_factors(product: LowRank, A0: Tensor, B_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(A, B) at A0's rank r with B @ A the truncated SVD of `product` at rank r (the product itself
    when its rank is at most r): A = V_r^T (orthonormal rows), B = U_r S_r (every singular value in B).

    Where `product` has rank k < r (singular values at rounding level do not count), the last r - k
    rows of A are A0's rows made orthonormal to the first k, and B's columns there are 0: B @ A is
    unchanged, A A^T = I still holds, and no rank is left with both factors 0 (a rank that no
    gradient could revive). A zero product has no singular directions at all: A0 is kept, B = 0.
    Singular vectors have arbitrary signs: each pair is flipped so that the largest entry (in
    magnitude) of its row of A is positive, so the factors do not depend on how the sum was formed
    (the order the clients came in), and re-factoring B @ A (distinct singular values) gives A and B
    back. Computed in float64 from the factors (`LowRank.svd`), never as a dense matrix.
    """
    left, s, right = product.svd()
    r, k = A0.shape[0], min(A0.shape[0], s.numel())
    B = torch.zeros(left.shape[0], r, dtype=torch.float64)
    if k == 0:
        return A0, B.to(B_dtype)
    A = torch.zeros(r, right.shape[1], dtype=torch.float64)
    A[:k], B[:, :k] = right[:k], left[:, :k] * s[:k]
    if k < r:
        # Householder QR: Q's columns are orthonormal however degenerate A0 is; the first k span right[:k]
        q, _ = torch.linalg.qr(torch.cat([right[:k].T, A0.double().T], 1))
        extra = q[:, k:r].T  # fewer than r - k rows only when r > d_in: the rest stay 0
        A[k: k + extra.shape[0]] = extra
    signs = torch.sign(A.gather(1, A.abs().argmax(1, keepdim=True))).squeeze(1)
    signs[signs == 0] = 1  # a row of zeros (r > d_in)
    return (A * signs[:, None]).to(A0.dtype), (B * signs).to(B_dtype)

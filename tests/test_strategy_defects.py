"""Two defects of exact strategies, pinned: FedEx's residual keeps only real directions in float32 as
in float64, and a published round loads with plain PEFT whatever its module names."""

from __future__ import annotations

import pytest
import torch
from conftest import tol
from peft import PeftModel
from torch import nn

from peft_federated import FederatedLoraConfig, GlobalState, get_strategy
from peft_federated.hub_integration.layout import read_round, write_round
from peft_federated.state import lora_key

K, R = 4, 4
SHAPES = {"wide": (24, 40), "tall": (40, 28)}  # (d_out, d_in): non-square, and above K r + r = 20 both ways


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [3, 1, 7, 2]])
@pytest.mark.parametrize("spread", [1.0, 1e-2])  # clients apart, or close (a small residual, all of it kept)
def test_fedex_residual_has_rank_at_most_k_minus_1_r_in_every_dtype(gen, dtype, weights, spread):
    """R = sum p_k B_k A_k - B A = sum p_k (B_k - B)(A_k - A) has rank <= (K-1) r: directions at the
    rounding level of the averages (float32's, ~1e-8 of the largest) are not part of it."""
    config = FederatedLoraConfig(strategy="fedex", r=R, lora_alpha=2 * R, target_modules=list(SHAPES))
    s = get_strategy(config)
    tensors = {}
    for m, (d_out, d_in) in SHAPES.items():
        tensors[lora_key(m, "lora_A")] = torch.randn(R, d_in, generator=gen, dtype=dtype)
        tensors[lora_key(m, "lora_B")] = torch.zeros(d_out, R, dtype=dtype)
    state = GlobalState(round=0, tensors=tensors)
    centre = {k: torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in tensors.items()}
    ups = [{k: v + spread * torch.randn(v.shape, generator=gen, dtype=dtype) for k, v in centre.items()} for _ in range(K)]
    new = s.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, weights))])
    p = [w / sum(weights) for w in weights]
    for m, (d_out, d_in) in SHAPES.items():
        residual = new.base_delta[m]
        assert residual.rank == (K - 1) * R, (m, residual.rank)
        assert residual.U.shape == (d_out, (K - 1) * R) and residual.V.shape == ((K - 1) * R, d_in)
        ideal = sum(pk * u[lora_key(m, "lora_B")].double() @ u[lora_key(m, "lora_A")].double() for pk, u in zip(p, ups))
        W0 = torch.randn(d_out, d_in, generator=gen, dtype=dtype)
        scale = config.scaling
        published = W0 + scale * residual.dense() + scale * new.factor(m, "lora_B") @ new.factor(m, "lora_A")
        torch.testing.assert_close(published, (W0.double() + scale * ideal).to(dtype), **tol(dtype))


class Nested(nn.Module):
    """Target modules whose paths are suffixes of each other: `fc` and `sub.fc` (PEFT matches
    rank_pattern keys by dotted suffix, so a bare `fc` key would also give `sub.fc` its rank)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 2)  # first: its pattern key comes first
        self.sub = nn.Module()
        self.sub.fc = nn.Linear(6, 6)
        self.head = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.sub.fc(x)))))


def nested_model(dtype):
    torch.manual_seed(0)
    return Nested().to(dtype)


@pytest.mark.parametrize("name", ["fedex", "flora"])
def test_a_round_loads_with_plain_peft_when_module_names_are_suffixes_of_each_other(tmp_path, gen, dtype, name):
    from peft import get_peft_model

    kw = {"client_ranks": {"c0": 2, "c1": 1, "c2": 2}} if name == "flora" else {}
    config = FederatedLoraConfig(strategy=name, r=2, lora_alpha=4, target_modules=["fc"], modules_to_save=["head"], **kw)
    s = get_strategy(config)
    model = get_peft_model(nested_model(dtype), config.to_lora_config())
    state = s.initial_state(model)
    ups = []
    for k in range(3):
        payload = s.prepare_client(model, state, f"c{k}").payload()
        ups.append((f"c{k}", {key: torch.randn(v.shape, generator=gen, dtype=dtype) for key, v in payload.items()}, 1 + k))
    new = s.aggregate(state, ups)
    published_ranks = {m: config.r + new.base_delta[m].rank for m in ("fc", "sub.fc")}
    assert published_ranks["fc"] != published_ranks["sub.fc"], published_ranks  # (2 + 2 vs 2 + 4, or 2 + 5)
    write_round(tmp_path, new, config)
    x = torch.randn(5, 6, generator=gen, dtype=dtype)
    s.prepare_client(model, new, "c0")  # the federation's global model of the round
    model.eval()
    with torch.no_grad():
        expected = model(x)
        loaded = PeftModel.from_pretrained(nested_model(dtype), tmp_path)  # plain PEFT, nothing of ours
        torch.testing.assert_close(loaded(x), expected, **tol(dtype))
    for m, rank in published_ranks.items():
        assert loaded.base_model.model.get_submodule(m).r["default"] == rank
    state_back, _ = read_round(tmp_path)
    assert {m: d.rank for m, d in state_back.base_delta.items()} == {m: d.rank for m, d in new.base_delta.items()}

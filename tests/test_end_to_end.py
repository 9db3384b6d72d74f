"""Each strategy end to end on a tiny PEFT model: clients take real optimizer steps on their own
data, the server aggregates, and the published global model (loaded with plain PEFT) has the
effective weights base + s * B @ A (+ base change) that the strategy's formula gives, computed here."""

from __future__ import annotations

import pytest
import torch
from conftest import tol
from helpers import TinyNet, client_data, make_config, make_model, train_locally
from peft import PeftModel

from peft_federated import get_strategy
from peft_federated.adapter import effective_weight, read_tensors
from peft_federated.hub_integration import read_round, write_round
from peft_federated.state import lora_key
from peft_federated.strategies.lora_fair import fair_objective

MODULES = ("up", "down")
SAMPLES = {"c0": 12, "c1": 30, "c2": 7}


def published_weights(folder, dtype):
    """Effective weights of the round as plain PEFT loads it on the untouched base model."""
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyNet().to(dtype), folder)
    return {m: effective_weight(loaded, m) for m in MODULES}


def expected(name, cfg, prev_base, prev_state, trained, uploads):
    """The strategy's global effective weight per module, from the clients' trained factors."""
    s = cfg.scaling
    ids = list(uploads)
    if name == "hetlora":
        out = {}
        for m in MODULES:
            prods = {c: trained[c][lora_key(m, "lora_B")].double()[:, : uploads[c][lora_key(m, "lora_A")].shape[0]]
                     @ uploads[c][lora_key(m, "lora_A")].double() for c in ids}
            norms = {c: float(torch.linalg.norm(prods[c])) for c in ids}
            p = {c: norms[c] / sum(norms.values()) for c in ids}
            A = sum(p[c] * _pad_rows(uploads[c][lora_key(m, "lora_A")].double(), cfg.r) for c in ids)
            B = sum(p[c] * _pad_cols(uploads[c][lora_key(m, "lora_B")].double(), cfg.r) for c in ids)
            out[m] = prev_base[m] + s * B @ A
        return out
    p = {c: SAMPLES[c] / sum(SAMPLES[c] for c in ids) for c in ids}
    out = {}
    for m in MODULES:
        a, b = lora_key(m, "lora_A"), lora_key(m, "lora_B")
        if name in ("fedex", "flora"):  # exact: the mean of the clients' products
            out[m] = prev_base[m] + s * sum(p[c] * trained[c][b].double() @ trained[c][a].double() for c in ids)
        else:  # FedAvg of each factor; frozen factors are the global ones
            A = sum(p[c] * trained[c][a].double() for c in ids)
            B = sum(p[c] * trained[c][b].double() for c in ids)
            out[m] = prev_base[m] + s * B @ A
    return out


def _pad_rows(A, r):
    return torch.cat([A, torch.zeros(r - A.shape[0], A.shape[1], dtype=A.dtype)])


def _pad_cols(B, r):
    return torch.cat([B, torch.zeros(B.shape[0], r - B.shape[1], dtype=B.dtype)], 1)


@pytest.mark.parametrize("name", ["fedit", "ffa", "rolora", "hetlora", "lora_fair", "flora", "fedex"])
def test_strategy_end_to_end(tmp_path, dtype, name):
    ranks = {"c0": 1, "c2": 2} if name in ("hetlora", "flora") else None
    cfg = make_config(name, r=3, client_ranks=ranks)
    strategy = get_strategy(cfg)
    model = make_model(cfg, dtype)
    state = strategy.initial_state(model)
    write_round(tmp_path / "round-0000", state, cfg)
    for rnd in range(3):
        prev_folder = tmp_path / f"round-{rnd:04d}"
        prev_eff = published_weights(prev_folder, dtype)
        # the global model's base (without the trained factors) at the start of this round
        prev_base = {m: prev_eff[m] - cfg.scaling * state.factor(m, "lora_B").double() @ state.factor(m, "lora_A").double() for m in MODULES}
        trained, uploads = {}, {}
        for k, client in enumerate(SAMPLES):
            client_round = strategy.prepare_client(model, state, client)
            frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n and not p.requires_grad}
            x, y = client_data(100 * rnd + k, SAMPLES[client], dtype)
            train_locally(client_round, x, y)
            for n, p in model.named_parameters():
                if n in frozen_before:
                    assert p.grad is None and torch.equal(p.detach(), frozen_before[n])
            trained[client] = read_tensors(model)
            uploads[client] = client_round.payload()
        new = strategy.aggregate(state, [(c, uploads[c], SAMPLES[c]) for c in SAMPLES])
        folder = write_round(tmp_path / f"round-{rnd + 1:04d}", new, cfg)
        want = expected(name, cfg, prev_base, state, trained, uploads)
        got = published_weights(folder, dtype)
        for m in MODULES:
            assert got[m].shape == want[m].shape and got[m].shape[0] != got[m].shape[1]
            if name == "lora_fair":  # FedAvg plus the server correction of B: check the A it keeps and the dB it adds
                A = sum(SAMPLES[c] * trained[c][lora_key(m, "lora_A")].double() for c in SAMPLES) / sum(SAMPLES.values())
                B = sum(SAMPLES[c] * trained[c][lora_key(m, "lora_B")].double() for c in SAMPLES) / sum(SAMPLES.values())
                torch.testing.assert_close(new.factor(m, "lora_A").double(), A, **tol(dtype))
                dB = new.factor(m, "lora_B").double() - B
                torch.testing.assert_close(got[m], prev_base[m] + cfg.scaling * (B + dB) @ A, **tol(dtype))
                ideal = sum(SAMPLES[c] * trained[c][lora_key(m, "lora_B")].double() @ trained[c][lora_key(m, "lora_A")].double()
                            for c in SAMPLES) / sum(SAMPLES.values())
                lam = cfg.lora_fair_lambda
                assert fair_objective(dB, A, B, ideal, lam) <= fair_objective(0 * dB, A, B, ideal, lam) + 1e-6
                continue
            torch.testing.assert_close(got[m], want[m], **tol(dtype))
        assert any(not torch.allclose(got[m], prev_eff[m]) for m in MODULES), "training changed nothing"
        # the round folder reads back to the same state
        again, meta = read_round(folder)
        assert meta["round"] == rnd + 1 and meta["strategy"] == name
        for key in new.tensors:
            assert torch.equal(again.tensors[key], new.tensors[key])
        state = new


def test_rolora_uploads_only_the_active_factor(dtype):
    cfg = make_config("rolora", r=2)
    strategy = get_strategy(cfg)
    model = make_model(cfg, dtype)
    state = strategy.initial_state(model)
    for rnd, active in enumerate(["lora_B", "lora_A", "lora_B"]):
        cr = strategy.prepare_client(model, state, "c0")
        train_locally(cr, *client_data(rnd, 16, dtype))
        payload = cr.payload()
        factors = {k.split(".")[-2] for k in payload if ".lora_" in k}
        assert factors == {active}
        state = strategy.aggregate(state, [("c0", payload, 16)])


def test_hetlora_prunes_only_when_the_tail_shrank(dtype):
    cfg = make_config("hetlora", r=4, hetlora_gamma=0.5, hetlora_min_rank=1, client_ranks={"c": 4})
    strategy = get_strategy(cfg)
    model = make_model(cfg, dtype)
    state = strategy.initial_state(model)
    # give the tail ranks 2..3 a large norm, then train with a strong regulariser: the tail shrinks
    for m in MODULES:
        state.tensors[lora_key(m, "lora_B")] = torch.ones_like(state.factor(m, "lora_B"))
    strong = make_config("hetlora", r=4, hetlora_gamma=0.5, hetlora_reg=5.0, client_ranks={"c": 4})
    cr = get_strategy(strong).prepare_client(model, state, "c")
    train_locally(cr, *client_data(0, 16, dtype), steps=5, lr=0.05)
    assert cr.info["tail_norm_start"] > 0
    payload = cr.payload()
    assert cr.info["tail_norm_end"] < cr.info["tail_norm_start"]
    assert payload[lora_key("up", "lora_A")].shape[0] == 2  # floor(0.5 * 4)
    new = get_strategy(strong).aggregate(state, [("c", payload, 16)])
    assert new.strategy_state["client_ranks"] == {"c": 2}
    # the next round, the client trains at rank 2: ranks 2..3 stay exactly zero in its model
    cr2 = strategy.prepare_client(model, new, "c")
    assert cr2.rank == 2
    train_locally(cr2, *client_data(1, 16, dtype))
    A = model.base_model.model.up.lora_A["default"].weight
    assert torch.count_nonzero(A[2:]) == 0
    # no regulariser: the tail only grows from zero B, so no pruning
    cfg0 = make_config("hetlora", r=4, hetlora_gamma=0.5, hetlora_reg=0.0, client_ranks={"c": 4})
    fresh = get_strategy(cfg0).initial_state(model)
    cr3 = get_strategy(cfg0).prepare_client(model, fresh, "c")
    train_locally(cr3, *client_data(2, 16, dtype))
    assert cr3.payload()[lora_key("up", "lora_A")].shape[0] == 4

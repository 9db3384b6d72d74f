"""The invariants of ../shared/ALGORITHMS.md, on random non-square factors, float32 and float64.

References are computed here by hand (sums, pads, products), independently of the library.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tol
from helpers import make_config

from peft_federated import GlobalState, LowRank, get_strategy
from peft_federated.state import lora_key
from peft_federated.strategies.lora_fair import fair_correction, fair_objective

SHAPES = {"up": (5, 7), "down": (3, 5), "wide": (4, 11)}  # module: (d_out, d_in), all non-square
R = 3


def random_state(gen, dtype, r=R, round=0) -> GlobalState:
    tensors = {}
    for m, (d_out, d_in) in SHAPES.items():
        tensors[lora_key(m, "lora_A")] = torch.randn(r, d_in, generator=gen, dtype=dtype)
        tensors[lora_key(m, "lora_B")] = torch.randn(d_out, r, generator=gen, dtype=dtype)
    tensors["base_model.model.head.weight"] = torch.randn(2, 3, generator=gen, dtype=dtype)
    return GlobalState(round=round, tensors=tensors)


def random_update(state, gen, factors=("lora_A", "lora_B"), rank=R):
    out = {"base_model.model.head.weight": torch.randn(2, 3, generator=gen, dtype=state.tensors["base_model.model.head.weight"].dtype)}
    for m, (d_out, d_in) in SHAPES.items():
        dtype = state.factor(m, "lora_A").dtype
        if "lora_A" in factors:
            out[lora_key(m, "lora_A")] = torch.randn(rank, d_in, generator=gen, dtype=dtype)
        if "lora_B" in factors:
            out[lora_key(m, "lora_B")] = torch.randn(d_out, rank, generator=gen, dtype=dtype)
    return out


def random_upload(strategy, state, gen, rank=R):
    """A random update of exactly what `strategy` uploads in `state.round`: its shared factors and extras."""
    update = random_update(state, gen, strategy.shared_factors(state.round), rank)
    return {k: v for k, v in update.items() if k not in strategy.personal_keys(state)}


def weights(samples):
    return [n / sum(samples) for n in samples]


def aggregate(strategy, state, updates, samples):
    return strategy.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(updates, samples))])


SAMPLES = [3, 11, 6]


def test_fedit_is_the_weighted_mean_and_not_exact(gen, dtype):
    s = get_strategy(make_config("fedit", r=R))
    state = random_state(gen, dtype)
    ups = [random_update(state, gen) for _ in SAMPLES]
    new = aggregate(s, state, ups, SAMPLES)
    p = weights(SAMPLES)
    for m in SHAPES:
        A = sum(pk * u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        B = sum(pk * u[lora_key(m, "lora_B")] for pk, u in zip(p, ups))
        torch.testing.assert_close(new.factor(m, "lora_A"), A, **tol(dtype))
        torch.testing.assert_close(new.factor(m, "lora_B"), B, **tol(dtype))
        ideal = sum(pk * u[lora_key(m, "lora_B")] @ u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        assert torch.linalg.norm(B @ A - ideal) > 1e-3  # FedIT's aggregation error on random factors
    head = sum(pk * u["base_model.model.head.weight"] for pk, u in zip(p, ups))
    torch.testing.assert_close(new.tensors["base_model.model.head.weight"], head, **tol(dtype))


@pytest.mark.parametrize("shared", ["lora_A", "lora_B"])
def test_fedit_is_exact_when_one_factor_is_shared(gen, dtype, shared):
    s = get_strategy(make_config("fedit", r=R))
    state = random_state(gen, dtype)
    ups = [random_update(state, gen) for _ in SAMPLES]
    for u in ups[1:]:
        for m in SHAPES:
            u[lora_key(m, shared)] = ups[0][lora_key(m, shared)].clone()
    new = aggregate(s, state, ups, SAMPLES)
    p = weights(SAMPLES)
    for m in SHAPES:
        ideal = sum(pk * u[lora_key(m, "lora_B")] @ u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        torch.testing.assert_close(new.factor(m, "lora_B") @ new.factor(m, "lora_A"), ideal, **tol(dtype))


def test_uniform_weighting_ignores_sample_counts(gen, dtype):
    s = get_strategy(make_config("fedit", r=R, weighting="uniform"))
    state = random_state(gen, dtype)
    ups = [random_update(state, gen) for _ in SAMPLES]
    new = aggregate(s, state, ups, SAMPLES)
    for m in SHAPES:
        mean = sum(u[lora_key(m, "lora_A")] for u in ups) / len(ups)
        torch.testing.assert_close(new.factor(m, "lora_A"), mean, **tol(dtype))


@pytest.mark.parametrize("name,round,frozen", [("ffa", 0, "lora_A"), ("ffa", 5, "lora_A"), ("rolora", 0, "lora_A"), ("rolora", 1, "lora_B"), ("rolora", 4, "lora_A")])
def test_frozen_factor_aggregation_is_exact(gen, dtype, name, round, frozen):
    s = get_strategy(make_config(name, r=R))
    state = random_state(gen, dtype, round=round)
    active = "lora_B" if frozen == "lora_A" else "lora_A"
    assert s.trainable_factors(round) == (active,)
    ups = [random_update(state, gen, factors=(active,)) for _ in SAMPLES]
    new = aggregate(s, state, ups, SAMPLES)
    p = weights(SAMPLES)
    for m in SHAPES:
        assert torch.equal(new.factor(m, frozen), state.factor(m, frozen))
        A0, B0 = state.factor(m, "lora_A"), state.factor(m, "lora_B")
        if frozen == "lora_A":
            ideal = sum(pk * u[lora_key(m, "lora_B")] @ A0 for pk, u in zip(p, ups))
        else:
            ideal = sum(pk * B0 @ u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        torch.testing.assert_close(new.factor(m, "lora_B") @ new.factor(m, "lora_A"), ideal, **tol(dtype))


def test_rolora_phase_alternates_starting_with_B():
    s = get_strategy(make_config("rolora"))
    assert [s.trainable_factors(t) for t in range(4)] == [("lora_B",), ("lora_A",), ("lora_B",), ("lora_A",)]


def test_fedex_residual_makes_aggregation_exact(gen, dtype):
    cfg = make_config("fedex", r=R)
    s = get_strategy(cfg)
    state = random_state(gen, dtype)
    ups = [random_update(state, gen) for _ in SAMPLES]
    new = aggregate(s, state, ups, SAMPLES)
    p = weights(SAMPLES)
    for m, (d_out, d_in) in SHAPES.items():
        A = sum(pk * u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        B = sum(pk * u[lora_key(m, "lora_B")] for pk, u in zip(p, ups))
        torch.testing.assert_close(new.factor(m, "lora_A"), A, **tol(dtype))
        torch.testing.assert_close(new.factor(m, "lora_B"), B, **tol(dtype))
        ideal = sum(pk * u[lora_key(m, "lora_B")] @ u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        R_ = new.base_delta[m]
        assert R_.U.shape[0] == d_out and R_.V.shape[1] == d_in  # not transposed
        assert R_.rank <= min(len(SAMPLES) * R, d_out, d_in)
        # W0' + s B A == W0 + s sum p_k B_k A_k, for any W0
        W0 = torch.randn(d_out, d_in, generator=gen, dtype=dtype)
        s_ = cfg.scaling
        torch.testing.assert_close(W0 + s_ * R_.dense() + s_ * B @ A, W0 + s_ * ideal, **tol(dtype))


def test_fedex_residual_is_zero_for_one_or_identical_clients(gen, dtype):
    s = get_strategy(make_config("fedex", r=R))
    state = random_state(gen, dtype)
    one = random_update(state, gen)
    assert all(d.rank == 0 for d in aggregate(s, state, [one], [5]).base_delta.values())
    same = aggregate(s, state, [one, {k: v.clone() for k, v in one.items()}], [5, 9])
    assert all(d.rank == 0 for d in same.base_delta.values())


def test_fedex_residual_accumulates_over_rounds(gen, dtype):
    s = get_strategy(make_config("fedex", r=R))
    state = random_state(gen, dtype)
    total = {m: torch.zeros(SHAPES[m], dtype=torch.float64) for m in SHAPES}
    for _ in range(3):
        ups = [random_update(state, gen) for _ in SAMPLES]
        new = aggregate(s, state, ups, SAMPLES)
        p = weights(SAMPLES)
        for m in SHAPES:
            ideal = sum(pk * u[lora_key(m, "lora_B")].double() @ u[lora_key(m, "lora_A")].double() for pk, u in zip(p, ups))
            total[m] += ideal - new.factor(m, "lora_B").double() @ new.factor(m, "lora_A").double()
            torch.testing.assert_close(new.base_delta[m].dense().double(), total[m], **tol(dtype))
            assert new.base_delta[m].rank <= min(SHAPES[m])
        state = new


@pytest.mark.parametrize("ranks", [[R, R, R], [1, 3, 2]])
def test_flora_stack_equals_weighted_sum(gen, dtype, ranks):
    cfg = make_config("flora", r=R, client_ranks={f"c{k}": rk for k, rk in enumerate(ranks)})
    s = get_strategy(cfg)
    state = random_state(gen, dtype)
    ups = [random_update(state, gen, rank=rk) for rk in ranks]
    new = aggregate(s, state, ups, SAMPLES)
    p = weights(SAMPLES)
    for m in SHAPES:
        ideal = sum(pk * u[lora_key(m, "lora_B")] @ u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        torch.testing.assert_close(new.base_delta[m].dense(), ideal, **tol(dtype))
        assert torch.count_nonzero(new.factor(m, "lora_B")) == 0  # clients start fresh on the merged base


def test_flora_stacked_adapter_keeps_the_clients_scale(tmp_path, gen, dtype):
    """Plain PEFT, loading the stacked adapter, applies exactly the clients' scale s."""
    from helpers import make_model
    from peft import PeftModel

    from peft_federated.adapter import effective_weight
    from peft_federated.hub_integration import write_round

    cfg = make_config("flora", r=R, client_ranks={"c0": 1, "c2": 2})
    model = make_model(cfg, dtype)
    s = get_strategy(cfg)
    state = s.initial_state(model)
    ups = []
    for k in range(3):
        cr = s.prepare_client(model, state, f"c{k}")
        ups.append((f"c{k}", {key: torch.randn(v.shape, generator=gen, dtype=dtype) for key, v in cr.payload().items()}, SAMPLES[k]))
    new = s.aggregate(state, ups)
    write_round(tmp_path, new, cfg)
    from helpers import TinyNet

    torch.manual_seed(0)
    base = TinyNet().to(dtype)
    w0 = {m: getattr(base, m).weight.detach().double().clone() for m in ("up", "down")}
    loaded = PeftModel.from_pretrained(base, tmp_path)
    p = weights(SAMPLES)
    for m in ("up", "down"):
        layer = getattr(loaded.base_model.model, m)
        assert layer.scaling["default"] == pytest.approx(cfg.scaling)
        ideal = sum(pk * u[lora_key(m, "lora_B")].double() @ u[lora_key(m, "lora_A")].double() for pk, (_, u, _) in zip(p, ups))
        torch.testing.assert_close(effective_weight(loaded, m), w0[m] + cfg.scaling * ideal, **tol(dtype))


def pad(A, B, r):
    A_p, B_p = torch.zeros(r, A.shape[1], dtype=A.dtype), torch.zeros(B.shape[0], r, dtype=B.dtype)
    A_p[: A.shape[0]], B_p[:, : B.shape[1]] = A, B
    return A_p, B_p


def test_hetlora_pads_and_weights_by_product_norm(gen, dtype):
    s = get_strategy(make_config("hetlora", r=R, client_ranks={"c0": 1, "c1": 3, "c2": 2}))
    state = random_state(gen, dtype)
    ranks = [1, 3, 2]
    ups = [random_update(state, gen, rank=rk) for rk in ranks]
    new = aggregate(s, state, ups, SAMPLES)
    assert new.strategy_state["client_ranks"] == {"c0": 1, "c1": 3, "c2": 2}
    for m in SHAPES:
        norms = [float(torch.linalg.norm(u[lora_key(m, "lora_B")].double() @ u[lora_key(m, "lora_A")].double())) for u in ups]
        p = [n / sum(norms) for n in norms]
        assert sum(p) == pytest.approx(1.0)
        padded = [pad(u[lora_key(m, "lora_A")], u[lora_key(m, "lora_B")], R) for u in ups]
        torch.testing.assert_close(new.factor(m, "lora_A"), sum(pk * a for pk, (a, _) in zip(p, padded)), **tol(dtype))
        torch.testing.assert_close(new.factor(m, "lora_B"), sum(pk * b for pk, (_, b) in zip(p, padded)), **tol(dtype))


def test_hetlora_truncate_then_pad_round_trips(gen, dtype):
    state = random_state(gen, dtype)
    for m in SHAPES:
        A, B = state.factor(m, "lora_A"), state.factor(m, "lora_B")
        for rk in range(1, R + 1):
            A_p, B_p = pad(A[:rk], B[:, :rk], R)
            assert torch.equal(A_p[:rk], A[:rk]) and torch.equal(B_p[:, :rk], B[:, :rk])
            assert torch.count_nonzero(A_p[rk:]) == 0 and torch.count_nonzero(B_p[:, rk:]) == 0
    s = get_strategy(make_config("hetlora", r=R, client_ranks={"c": 2}))
    start = s.client_start(state, "c", 2)
    from peft_federated.strategies.hetlora import pad_rank

    for m in SHAPES:
        A_p, B_p = pad_rank(start[lora_key(m, "lora_A")], start[lora_key(m, "lora_B")], R)
        assert torch.equal(A_p[:2], state.factor(m, "lora_A")[:2]) and torch.count_nonzero(A_p[2:]) == 0
        assert torch.equal(B_p[:, :2], state.factor(m, "lora_B")[:, :2]) and torch.count_nonzero(B_p[:, 2:]) == 0


def test_hetlora_equal_ranks_and_norms_is_plain_averaging(gen, dtype):
    s = get_strategy(make_config("hetlora", r=R))
    state = random_state(gen, dtype)
    ups = []
    for _ in SAMPLES:
        u = random_update(state, gen)
        for m in SHAPES:  # normalise every client's product to norm 1 per module
            a, b = lora_key(m, "lora_A"), lora_key(m, "lora_B")
            u[b] = u[b] / torch.linalg.norm(u[b].double() @ u[a].double()).to(dtype)
        ups.append(u)
    new = aggregate(s, state, ups, SAMPLES)
    for m in SHAPES:
        mean = sum(u[lora_key(m, "lora_A")] for u in ups) / len(ups)
        torch.testing.assert_close(new.factor(m, "lora_A"), mean, **tol(dtype))


def test_lora_fair_correction_improves_the_objective(gen, dtype):
    cfg = make_config("lora_fair", r=R, lora_fair_steps=300, lora_fair_lr=1e-2)
    s = get_strategy(cfg)
    state = random_state(gen, dtype)
    ups = [random_update(state, gen) for _ in SAMPLES]
    new = aggregate(s, state, ups, SAMPLES)
    p = weights(SAMPLES)
    improved = 0
    for m in SHAPES:
        A = sum(pk * u[lora_key(m, "lora_A")] for pk, u in zip(p, ups))
        B = sum(pk * u[lora_key(m, "lora_B")] for pk, u in zip(p, ups))
        dW = sum(pk * u[lora_key(m, "lora_B")].double() @ u[lora_key(m, "lora_A")].double() for pk, u in zip(p, ups))
        torch.testing.assert_close(new.factor(m, "lora_A"), A, **tol(dtype))  # A unchanged
        dB = new.factor(m, "lora_B").double() - B.double()
        lam = cfg.lora_fair_lambda
        before = float(fair_objective(torch.zeros_like(dB), A.double(), B.double(), dW, lam))
        after = float(fair_objective(dB, A.double(), B.double(), dW, lam))
        assert after <= before + 1e-6
        cos = lambda X: float(torch.nn.functional.cosine_similarity((X @ A.double()).flatten(), dW.flatten(), dim=0))
        assert cos(B.double() + dB) >= cos(B.double()) - 1e-6
        improved += after < before - 1e-4
    assert improved >= 1  # on random factors the correction must actually do something


def test_lora_fair_solver_follows_the_dense_objective(gen):
    """The solver never forms (B + dB) A; its iterates are those of Adam on `fair_objective` itself
    (the paper's dense definition), written out here."""
    A, B = torch.randn(3, 11, generator=gen, dtype=torch.float64), torch.randn(7, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(7, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, 11, generator=gen, dtype=torch.float64)
    lam, steps, lr = 0.01, 40, 1e-2  # at 0.05 a few draws in a hundred keep dB = 0 (their first step raises the objective)
    dB = torch.zeros_like(B, requires_grad=True)
    optimizer = torch.optim.Adam([dB], lr=lr)
    values, iterates = [], []
    for _ in range(steps):
        value = fair_objective(dB, A, B, target, lam)
        values.append(value.item())
        iterates.append(dB.detach().clone())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    values.append(fair_objective(dB, A, B, target, lam).item())
    iterates.append(dB.detach().clone())
    want = iterates[min(range(len(values)), key=values.__getitem__)]
    assert torch.linalg.norm(want) > 1e-3  # the reference moved
    torch.testing.assert_close(fair_correction(A, B, target, lam, steps, lr), want, rtol=1e-9, atol=1e-12)


def test_lora_fair_large_lambda_is_fedit(gen, dtype):
    state = random_state(gen, dtype)
    A, B = state.factor("up", "lora_A"), state.factor("up", "lora_B")
    target = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    dB = fair_correction(A, B, target, lam=1e6, steps=100, lr=1e-2)
    assert float(torch.linalg.norm(dB)) < 1e-6
    dB_small = fair_correction(A, B, target, lam=0.0, steps=100, lr=1e-2)
    assert float(torch.linalg.norm(dB_small)) > 1e-3


@pytest.mark.parametrize("name", ["fedit", "ffa", "rolora", "hetlora", "lora_fair", "flora", "fedex", "fedsa"])
def test_streaming_equals_all_at_once(gen, dtype, name):
    """One update at a time, in any order, gives the all-at-once aggregate (computed here by hand for the sums)."""
    s = get_strategy(make_config(name, r=R))
    state = random_state(gen, dtype, round=1)
    ups = [random_upload(s, state, gen) for _ in range(5)]
    samples = [4, 1, 9, 2, 7]
    agg = s.aggregator(state)
    for k in [3, 0, 4, 1, 2]:
        agg.accept(ups[k], samples[k], f"c{k}")
    streamed = agg.result()
    at_once = aggregate(s, state, ups, samples)
    for key in state.tensors:
        torch.testing.assert_close(streamed.tensors[key], at_once.tensors[key], **tol(dtype))
    for m in streamed.base_delta:
        torch.testing.assert_close(streamed.base_delta[m].dense(), at_once.base_delta[m].dense(), **tol(dtype))


def test_stack_recompression_bounds_memory(gen):
    """Many FedEx clients: the stacked factors never exceed about min(d_out, d_in) ranks."""
    s = get_strategy(make_config("fedex", r=R))
    state = random_state(gen, torch.float64)
    agg = s.aggregator(state)
    ups = [random_update(state, gen) for _ in range(40)]
    for k, u in enumerate(ups):
        agg.accept(u, 1, f"c{k}")
        for m, module in agg.modules.items():
            assert module.products.stack.rank <= min(SHAPES[m]) + R
    new = agg.result()
    for m in SHAPES:
        ideal = sum(u[lora_key(m, "lora_B")] @ u[lora_key(m, "lora_A")] for u in ups) / len(ups)
        torch.testing.assert_close(new.base_delta[m].dense() + new.factor(m, "lora_B") @ new.factor(m, "lora_A"), ideal, **tol(torch.float64))


def test_lowrank_compression_is_exact_and_minimal(gen, dtype):
    U = torch.randn(9, 2, generator=gen, dtype=dtype)
    V = torch.randn(2, 6, generator=gen, dtype=dtype)
    redundant = LowRank(torch.cat([U, U, -U], 1), torch.cat([V, 2 * V, V], 0))  # = 2 U V, rank 2
    small = redundant.compressed()
    assert small.rank == 2
    torch.testing.assert_close(small.dense(), 2 * U @ V, **tol(dtype))
    assert small.U.dtype == dtype and math.prod(small.U.shape) == 18

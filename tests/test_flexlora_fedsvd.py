"""FlexLoRA and FedSVD: the invariants of ../shared/ALGORITHMS.md on random non-square factors (float32
and float64, references computed here by hand), local training end to end, the real Trainer through a
store with every published round loaded by plain PEFT, and hostile updates refused with their reasons.

Singular vectors have arbitrary signs: products are compared, not factors.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tol
from helpers import TinyNet, client_data, make_config, make_model, train_locally
from peft import PeftModel
from safetensors.torch import save as save_bytes
from test_accept_files import test_files_module_by_module_equal_accept_one_by_one as files_equal_accept
from test_hostile_updates import assert_published, honest, record_for, upload_raw
from test_hub_store import Federation, random_payload
from test_invariants import SHAPES, random_state, random_update
from test_invariants import test_streaming_equals_all_at_once as streaming_equals_all_at_once
from tiny import federate, tiny_bert, tiny_config, token_dataset

from peft_federated import get_strategy
from peft_federated.adapter import effective_weight, read_tensors
from peft_federated.aggregator import initialize
from peft_federated.hub_integration import LocalStore, write_round
from peft_federated.state import lora_key

R = 3
SAMPLES = [3, 11, 6]
RANKS = {"c0": 1, "c1": 3, "c2": 2}  # FlexLoRA's heterogeneous clients (r = 3)


def p_of(samples):
    return [n / sum(samples) for n in samples]


def product(state, m):
    return state.factor(m, "lora_B").double() @ state.factor(m, "lora_A").double()


def svd_tail(dW, rank):
    """sum of sigma_i^2 beyond `rank` (Eckart-Young's error of the best rank-`rank` approximation)."""
    return float((torch.linalg.svdvals(dW)[rank:] ** 2).sum())


def assert_best_approximation(dW, approx, rank, dtype):
    """||dW - approx||_F^2 = sum of sigma_i^2 beyond `rank`, compared as norms: the factors' rounding
    to `dtype` moves ||dW - approx|| by at most the rounding's own norm."""
    error = float(torch.linalg.norm(dW - approx))
    bound = (1e-5 if dtype == torch.float32 else 1e-11) * float(torch.linalg.norm(dW))
    assert abs(error - svd_tail(dW, rank) ** 0.5) <= bound, (error, svd_tail(dW, rank) ** 0.5, bound)


def assert_orthonormal_rows(A, dtype):
    torch.testing.assert_close(A.double() @ A.double().T, torch.eye(A.shape[0], dtype=torch.float64), **tol(dtype))


def flexlora_round(gen, dtype, ranks=RANKS, samples=SAMPLES, **kw):
    cfg = make_config("flexlora", r=R, client_ranks=ranks, **kw)
    s = get_strategy(cfg)
    state = random_state(gen, dtype)
    ups = [random_update(state, gen, rank=rk) for rk in ranks.values()]
    new = s.aggregate(state, [(c, u, n) for c, u, n in zip(ranks, ups, samples)])
    return cfg, s, state, ups, new


def weighted_product(ups, p, m):
    """sum_k p_k B_k A_k, by hand, in float64."""
    return sum(pk * u[lora_key(m, "lora_B")].double() @ u[lora_key(m, "lora_A")].double() for pk, u in zip(p, ups))


# ---- FlexLoRA ------------------------------------------------------------------------------------

def test_flexlora_dw_is_the_explicit_weighted_sum_with_weights_summing_to_one(gen, dtype):
    cfg = make_config("flexlora", r=R, client_ranks=RANKS)
    s = get_strategy(cfg)
    state = random_state(gen, dtype)
    ups = [random_update(state, gen, rank=rk) for rk in RANKS.values()]
    agg = s.aggregator(state)
    for c, u, n in zip(RANKS, ups, SAMPLES):
        agg.accept(u, n, c)
    p = [agg.clients[c]["weight"] / sum(i["weight"] for i in agg.clients.values()) for c in RANKS]
    assert sum(p) == pytest.approx(1.0) and p == pytest.approx(p_of(SAMPLES))
    for m in SHAPES:
        dW = cfg.scaling * agg.modules[m].products.mean().dense()  # s sum p_k B_k A_k, as the server holds it
        torch.testing.assert_close(dW, cfg.scaling * weighted_product(ups, p, m), **tol(torch.float64))
    # scaling every count by 7 changes no weight; uniform weighting ignores the counts
    scaled = s.aggregate(state, [(c, u, 7 * n) for c, u, n in zip(RANKS, ups, SAMPLES)])
    uniform = get_strategy(make_config("flexlora", r=R, client_ranks=RANKS, weighting="uniform")).aggregate(
        state, [(c, u, n) for c, u, n in zip(RANKS, ups, SAMPLES)])
    new = agg.result()
    for m in SHAPES:
        torch.testing.assert_close(product(scaled, m), product(new, m), **tol(dtype))
        assert_best_approximation(weighted_product(ups, [1 / 3] * 3, m), product(uniform, m), R, dtype)


def test_flexlora_global_factors_are_the_truncated_svd(gen, dtype):
    """||dW - s B_r A_r||^2 = sum of sigma_i^2 beyond r, at the global rank and at each client's
    truncation (its start next round); A_r has orthonormal rows."""
    ranks = {"c0": 2, "c1": 3, "c2": 2}  # sum of ranks 7 > r: dW has rank 3..min(d), truncation loses its tail
    cfg, s, state, ups, new = flexlora_round(gen, dtype, ranks)
    sc = cfg.scaling
    for m in SHAPES:
        dW = sc * weighted_product(ups, p_of(SAMPLES), m)
        assert torch.linalg.matrix_rank(dW) == min(SHAPES[m])  # beyond r (but for 3 x 5 "down"): the test can fail
        A, B = new.factor(m, "lora_A"), new.factor(m, "lora_B")
        assert A.dtype == B.dtype == dtype and A.shape == state.factor(m, "lora_A").shape
        assert_orthonormal_rows(A, dtype)
        for rank in (R, *ranks.values()):
            start = s.client_start(new, "c", rank)
            A_r, B_r = start[lora_key(m, "lora_A")].double(), start[lora_key(m, "lora_B")].double()
            assert_best_approximation(dW, sc * B_r @ A_r, rank, dtype)
        sv = torch.linalg.svdvals(dW)[:R]  # all singular values in B: its columns' norms are sigma_i / s
        torch.testing.assert_close(torch.linalg.norm(B.double(), dim=0), sv / sc, **tol(dtype))


@pytest.mark.parametrize("ranks", [{"c0": 1, "c1": 2}, {"c0": 1}, {"c0": 3}])
def test_flexlora_is_exact_once_r_reaches_the_rank_of_dw(gen, dtype, ranks):
    """rank(dW) <= sum r_k <= r: nothing is lost, and A keeps r orthonormal rows (the ranks beyond
    rank(dW) get directions orthogonal to dW's, with B = 0 there)."""
    cfg, s, state, ups, new = flexlora_round(gen, dtype, ranks, SAMPLES[: len(ranks)])
    for m in SHAPES:
        dW = weighted_product(ups, p_of(SAMPLES[: len(ranks)]), m)
        torch.testing.assert_close(product(new, m), dW, **tol(dtype))
        assert_orthonormal_rows(new.factor(m, "lora_A"), dtype)
        k = sum(ranks.values())
        assert torch.count_nonzero(new.factor(m, "lora_B")[:, k:]) == 0


def test_flexlora_zero_updates_keep_a_and_give_b_zero(gen, dtype):
    """All B_k = 0 (nobody trained B from round 0's B = 0): dW = 0 has no singular directions."""
    cfg = make_config("flexlora", r=R, client_ranks=RANKS)
    s = get_strategy(cfg)
    state = random_state(gen, dtype)
    ups = []
    for rk in RANKS.values():
        u = random_update(state, gen, rank=rk)
        ups.append({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in u.items()})
    new = s.aggregate(state, [(c, u, n) for c, u, n in zip(RANKS, ups, SAMPLES)])
    for m in SHAPES:
        assert torch.equal(new.factor(m, "lora_A"), state.factor(m, "lora_A"))
        assert torch.count_nonzero(new.factor(m, "lora_B")) == 0


def test_flexlora_server_memory_is_bounded_by_the_stacked_rank(gen):
    """40 clients: the stacked factors stay at most min(d_out, d_in) + r ranks; the result is still
    the truncated SVD of the exact weighted sum."""
    cfg = make_config("flexlora", r=R)
    s = get_strategy(cfg)
    state = random_state(gen, torch.float64)
    agg = s.aggregator(state)
    ups = [random_update(state, gen) for _ in range(40)]
    for k, u in enumerate(ups):
        agg.accept(u, 1 + k % 3, f"c{k}")
        for m, module in agg.modules.items():
            assert module.products.stack.rank <= min(SHAPES[m]) + R
    new = agg.result()
    p = p_of([1 + k % 3 for k in range(40)])
    for m in SHAPES:
        assert_best_approximation(weighted_product(ups, p, m), product(new, m), R, torch.float64)


# ---- FedSVD --------------------------------------------------------------------------------------

def fedsvd_round(gen, dtype, round=0, **kw):
    cfg = make_config("fedsvd", r=R, **kw)
    s = get_strategy(cfg)
    state = random_state(gen, dtype, round=round)
    assert s.trainable_factors(round) == ("lora_B",)
    ups = [random_update(state, gen, factors=("lora_B",)) for _ in SAMPLES]
    return s, state, ups, s.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, SAMPLES))])


def averaged_B_times_A(state, ups, m):
    """(sum_k p_k B_k) A, by hand: the exact aggregate, since A is shared."""
    B = sum(pk * u[lora_key(m, "lora_B")].double() for pk, u in zip(p_of(SAMPLES), ups))
    return B @ state.factor(m, "lora_A").double()


def test_fedsvd_refactoring_keeps_the_product_with_orthonormal_a_and_diagonal_btb(gen, dtype):
    s, state, ups, new = fedsvd_round(gen, dtype)
    for m in SHAPES:
        torch.testing.assert_close(product(new, m), averaged_B_times_A(state, ups, m), **tol(dtype))
        A, B = new.factor(m, "lora_A"), new.factor(m, "lora_B")
        assert not torch.allclose(A, state.factor(m, "lora_A"))  # refactored: the test can fail
        assert_orthonormal_rows(A, dtype)
        gram = B.double().T @ B.double()
        diag = torch.diagonal(gram)
        torch.testing.assert_close(gram / diag.max(), torch.diag(diag) / diag.max(), **tol(dtype))
        assert bool((diag[:-1] >= diag[1:]).all())  # non-increasing: S_r^2 in descending order
        torch.testing.assert_close(diag.sqrt(), torch.linalg.svdvals(averaged_B_times_A(state, ups, m))[:R], **tol(dtype))


def test_fedsvd_refactoring_twice_changes_only_signs(gen, dtype):
    """A round where every client uploads the global B unchanged: the second SVD gives A' = D A and
    B' = B D with D diagonal of +-1."""
    s, _, _, first = fedsvd_round(gen, dtype)
    unchanged = {k: v.clone() for k, v in first.tensors.items() if "lora_A" not in k}
    second = s.aggregate(first, [("c0", unchanged, 4), ("c1", {k: v.clone() for k, v in unchanged.items()}, 9)])
    for m in SHAPES:
        A1, A2 = first.factor(m, "lora_A").double(), second.factor(m, "lora_A").double()
        signs = torch.sign((A1 * A2).sum(1))
        assert bool((signs.abs() == 1).all())
        torch.testing.assert_close(A2, signs[:, None] * A1, **tol(dtype))
        torch.testing.assert_close(second.factor(m, "lora_B").double(), first.factor(m, "lora_B").double() * signs, **tol(dtype))


def test_fedsvd_refactors_every_period_rounds(gen, dtype):
    """fedsvd_period=2: aggregating round 0 only averages B (A bit-identical), round 1 refactors."""
    s, state, ups, new = fedsvd_round(gen, dtype, round=0, fedsvd_period=2)
    for m in SHAPES:
        assert torch.equal(new.factor(m, "lora_A"), state.factor(m, "lora_A"))
        B = sum(pk * u[lora_key(m, "lora_B")] for pk, u in zip(p_of(SAMPLES), ups))
        torch.testing.assert_close(new.factor(m, "lora_B"), B, **tol(dtype))
    assert [s.refactors(t) for t in range(4)] == [False, True, False, True]
    _, state, ups, new = fedsvd_round(gen, dtype, round=1, fedsvd_period=2)
    for m in SHAPES:
        assert_orthonormal_rows(new.factor(m, "lora_A"), dtype)
        torch.testing.assert_close(product(new, m), averaged_B_times_A(state, ups, m), **tol(dtype))


def test_fedsvd_round_zero_with_b_still_zero_keeps_a(dtype):
    """Round 0 (A from init_seed, B = 0) when no client moved B: B A = 0 has no SVD to take."""
    cfg = make_config("fedsvd", r=R)
    s = get_strategy(cfg)
    model = make_model(cfg, dtype)
    state = s.initial_state(model)
    payload = s.prepare_client(model, state, "c0").payload()
    assert not any("lora_A" in k for k in payload) and all(torch.count_nonzero(v) == 0 for k, v in payload.items() if "lora_B" in k)
    new = s.aggregate(state, [("c0", payload, 5)])
    for m in ("up", "down"):
        assert torch.equal(new.factor(m, "lora_A"), state.factor(m, "lora_A"))
        assert torch.count_nonzero(new.factor(m, "lora_B")) == 0


def test_fedsvd_of_a_rank_deficient_b_completes_a_orthonormally(gen, dtype):
    """One client whose B has rank 1: B A has rank 1 < r; A still has r orthonormal rows and the product is kept."""
    cfg = make_config("fedsvd", r=R)
    s = get_strategy(cfg)
    state = random_state(gen, dtype)
    up = random_update(state, gen, factors=("lora_B",))
    for m, (d_out, _) in SHAPES.items():
        # u v^T with v's entries powers of 2: exactly rank 1 in float32 too
        up[lora_key(m, "lora_B")] = torch.randn(d_out, 1, generator=gen, dtype=dtype) * torch.tensor([1.0, -2.0, 0.5], dtype=dtype)
    new = s.aggregate(state, [("c0", up, 3)])
    for m in SHAPES:
        A = new.factor(m, "lora_A")
        assert_orthonormal_rows(A, dtype)
        want = up[lora_key(m, "lora_B")].double() @ state.factor(m, "lora_A").double()
        torch.testing.assert_close(product(new, m), want, **tol(dtype))
        assert torch.count_nonzero(new.factor(m, "lora_B")[:, 1:]) == 0


# ---- both: streaming, files, local training, the Trainer, plain PEFT -------------------------------

@pytest.mark.parametrize("name", ["flexlora", "fedsvd"])
def test_streaming_equals_all_at_once(gen, dtype, name):
    streaming_equals_all_at_once(gen, dtype, name)


@pytest.mark.parametrize("name", ["flexlora", "fedsvd"])
@pytest.mark.parametrize("round", [0, 1])
def test_files_equal_accept_one_by_one(tmp_path, gen, dtype, name, round):
    files_equal_accept(tmp_path, gen, dtype, name, round)


def test_flexlora_files_with_mixed_ranks_equal_accept_one_by_one(tmp_path, gen, dtype):
    from test_accept_files import assert_same_state, write_updates

    cfg, s, state, ups, one_by_one = flexlora_round(gen, dtype)
    paths = write_updates(tmp_path, ups)
    agg = s.aggregator(state)
    assert agg.accept_files([(c, p, n) for c, p, n in zip(RANKS, paths, SAMPLES)]) == {}
    assert_same_state(agg.result(), one_by_one)


def published(folder, dtype):
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(TinyNet().to(dtype), folder)
    return {m: effective_weight(loaded, m) for m in ("up", "down")}


@pytest.mark.parametrize("name", ["flexlora", "fedsvd"])
def test_local_training_end_to_end(tmp_path, dtype, name):
    """Three rounds of real optimizer steps on TinyNet; every published round, loaded with plain PEFT,
    has effective weights W0 + s B A with B A as the formula gives from the clients' trained factors."""
    samples = {"c0": 12, "c1": 30, "c2": 7}
    cfg = make_config(name, r=3, client_ranks={"c0": 1, "c2": 2} if name == "flexlora" else None)
    s, model = get_strategy(cfg), make_model(cfg, dtype)
    state = s.initial_state(model)
    torch.manual_seed(0)
    base = TinyNet().to(dtype)
    w0 = {m: getattr(base, m).weight.detach().double() for m in ("up", "down")}
    p = p_of(list(samples.values()))
    for rnd in range(3):
        trained, uploads = {}, {}
        for k, client in enumerate(samples):
            client_round = s.prepare_client(model, state, client)
            train_locally(client_round, *client_data(100 * rnd + k, samples[client], dtype))
            trained[client], uploads[client] = read_tensors(model), client_round.payload()
        new = s.aggregate(state, [(c, uploads[c], samples[c]) for c in samples])
        got = published(write_round(tmp_path / f"round-{rnd + 1:04d}", new, cfg), dtype)
        for m in ("up", "down"):
            a, b = lora_key(m, "lora_A"), lora_key(m, "lora_B")
            if name == "fedsvd":  # A frozen on every client: the mean of B times the round's A
                assert all(torch.equal(trained[c][a], state.factor(m, "lora_A")) for c in samples)
                dW = sum(pk * trained[c][b].double() for pk, c in zip(p, samples)) @ state.factor(m, "lora_A").double()
                torch.testing.assert_close(got[m], w0[m] + cfg.scaling * dW, **tol(dtype))
                assert_orthonormal_rows(new.factor(m, "lora_A"), dtype)
            else:  # each client's rank-masked product; the published adapter is dW's truncated SVD
                for c in samples:
                    rank = cfg.client_rank(c)
                    assert torch.count_nonzero(trained[c][a][rank:]) == torch.count_nonzero(trained[c][b][:, rank:]) == 0
                dW = sum(pk * trained[c][b].double() @ trained[c][a].double() for pk, c in zip(p, samples))
                assert_best_approximation(cfg.scaling * dW, got[m] - w0[m], cfg.r, dtype)
        assert any(not torch.allclose(product(new, m), product(state, m)) for m in ("up", "down")), "training changed nothing"
        state = new


@pytest.mark.parametrize("name", ["flexlora", "fedsvd"])
def test_trainer_federation_publishes_rounds_plain_peft_loads(tmp_path, name):
    """Clients run the real Trainer through a local store (alice at rank 2 under FlexLoRA); every
    published round loads with `PeftModel.from_pretrained` and gives the federation's logits."""
    cfg = tiny_config(name, num_rounds=2, local_steps=2, client_ranks={"alice": 2} if name == "flexlora" else None)
    store, trainers, _ = federate(tmp_path, cfg)
    s, model = get_strategy(cfg), tiny_bert(cfg)
    ids = torch.tensor(token_dataset(8, 3)["input_ids"])
    previous = None
    for rnd in range(cfg.num_rounds + 1):
        state, meta = store.read_round(rnd)
        assert meta["strategy"] == name and (rnd == 0 or len(meta["contributions"]) == 2)
        s.prepare_client(model, state, "global")  # not in client_ranks: the whole rank-r global model
        with torch.no_grad():
            want = model.eval()(input_ids=ids).logits
            loaded = PeftModel.from_pretrained(tiny_bert(cfg).unload(), str(store.round_path(rnd))).eval()
            torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        if rnd > 0:
            for m in state.modules():
                assert_orthonormal_rows(state.factor(m, "lora_A"), torch.float32)
            assert not torch.allclose(want, previous)
        previous = want
    for trainer in trainers:  # each trainer ends on the final round (FlexLoRA: its truncation)
        tensors = read_tensors(trainer.model)
        final, _ = store.read_round(cfg.num_rounds)
        rank = cfg.client_rank(trainer.client_id)
        for m in final.modules():
            assert torch.equal(tensors[lora_key(m, "lora_A")][:rank], final.factor(m, "lora_A")[:rank])


# ---- hostile updates -----------------------------------------------------------------------------

class LocalFederation(Federation):
    """test_hostile_updates' federation on a local store, with the strategy's config."""

    def __init__(self, tmp_path, cfg) -> None:
        self.kind, self.server, self.tmp_path, self.cfg = "local", None, tmp_path, cfg
        self.model = make_model(cfg)
        self.store = LocalStore(tmp_path / "store")
        initialize(self.store, cfg, self.model)


def factor_rank(payload, factor, rank):
    """The payload with every `factor` cut or grown to `rank` columns (lora_B) or rows (lora_A)."""
    out = {}
    for k, v in payload.items():
        if factor in k:
            v = (v[:rank] if factor == "lora_A" else v[:, :rank]) if rank <= (v.shape[0] if factor == "lora_A" else v.shape[1]) \
                else (torch.cat([v, v[:1]]) if factor == "lora_A" else torch.cat([v, v[:, :1]], 1))
        out[k] = v.contiguous()
    return out


def grow(payload, rank):
    return factor_rank(factor_rank(payload, "lora_A", rank), "lora_B", rank)


def with_nan(payload, factor):
    key = sorted(k for k in payload if factor in k)[-1]
    bad = payload[key].clone()
    bad.view(-1)[0] = float("nan")
    return {**payload, key: bad}


# strategy -> case -> (mallory's tensors from her honest payload (and the global A for FedSVD), reason)
HOSTILE = {
    "flexlora": {  # mallory trains at rank 1 (client_ranks), r = 2
        "rank above hers": (lambda p, A: grow(p, 2), "its rank must be in [1, 1]"),
        "A and B of different ranks": (lambda p, A: factor_rank(p, "lora_B", 2), "its rank must be in [1, 1]"),
        "lora_B missing": (lambda p, A: {k: v for k, v in p.items() if "lora_B" not in k}, "missing tensors"),
        "NaN in lora_A": (lambda p, A: with_nan(p, "lora_A"), "NaN or Inf"),
        "Inf in lora_B": (lambda p, A: {**p, **{k: torch.full_like(v, float("inf")) for k, v in p.items() if "lora_B" in k}}, "NaN or Inf"),
    },
    "fedsvd": {
        "lora_A uploaded too": (lambda p, A: {**p, **A}, "unexpected tensors"),
        "lora_A instead of lora_B": (lambda p, A: {**{k: v for k, v in p.items() if "lora_B" not in k}, **A}, "unexpected tensors"),
        "wrong rank": (lambda p, A: factor_rank(p, "lora_B", 1), "its rank must be in [2, 2]"),
        "NaN in lora_B": (lambda p, A: with_nan(p, "lora_B"), "NaN or Inf"),
    },
}


@pytest.mark.parametrize("name,case", [(n, c) for n in HOSTILE for c in HOSTILE[n]])
def test_a_hostile_update_is_refused_with_its_reason_and_the_others_are_published(tmp_path, name, case):
    make, reason = HOSTILE[name][case]
    cfg = make_config(name, r=2, client_ranks={"mallory": 1, "bob": 1} if name == "flexlora" else None)
    fed = LocalFederation(tmp_path, cfg)
    good = {"alice": honest(fed, "alice", 1), "bob": honest(fed, "bob", 2)}
    state, _ = fed.store.read_round(0)
    A = {lora_key(m, "lora_A"): state.factor(m, "lora_A") for m in state.modules()}
    weights = save_bytes(make(random_payload(cfg, state, fed.model, "mallory", 3), A))
    upload_raw(fed, "mallory", weights, record_for(fed, "mallory", weights))
    assert_published(fed, good, {"mallory": reason})


@pytest.mark.parametrize("name", ["flexlora", "fedsvd"])
def test_a_huge_update_is_refused_by_the_norm_bound(tmp_path, name):
    """Finite but huge factors (their SVD would overflow float32) meet `max_update_norm` like any other."""
    cfg = make_config(name, r=2, max_update_norm=1e3)
    fed = LocalFederation(tmp_path, cfg)
    good = {"alice": honest(fed, "alice", 1), "bob": honest(fed, "bob", 2)}
    huge = {k: v * 1e30 for k, v in random_payload(cfg, fed.store.read_round(0)[0], fed.model, "mallory", 3).items()}
    weights = save_bytes(huge)
    upload_raw(fed, "mallory", weights, record_for(fed, "mallory", weights))
    assert_published(fed, good, {"mallory": "above max_update_norm=1000"})

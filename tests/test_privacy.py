"""Client-level DP-FedAvg: the noise is what it claims, clipping comes first, the accounting is
dp-accounting's, and the budget stops the federation."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from scipy import stats

from helpers import make_config, make_model
from peft_federated import privacy
from peft_federated.state import lora_key
from peft_federated.strategies import get_strategy
from peft_federated.strategies.validation import change_norm, clip_change

DP = dict(weighting="uniform", dp_clip_norm=1.0, dp_num_clients=10, clients_per_round=4, dp_delta=1e-3)


def dp_config(strategy="fedit", **kw):
    return make_config(strategy, **{**DP, "dp_noise_multiplier": 0.5, **kw})


def changes(cfg, state, seed, scale=0.05, n=2):
    """n clients' updates: the round's start plus random changes of the uploaded tensors."""
    strategy = get_strategy(cfg)
    start = strategy.client_start(state, "x", cfg.r)
    keys = list(state.extra_keys()) + [lora_key(m, f) for m in state.modules() for f in strategy.trainable_factors(state.round)]
    g = torch.Generator().manual_seed(seed)
    return [{k: start[k] + scale * torch.randn(start[k].shape, generator=g, dtype=start[k].dtype) for k in keys} for _ in range(n)], start


def aggregate(cfg, state, updates):
    agg = get_strategy(cfg).aggregator(state)
    for i, u in enumerate(updates):
        agg.accept(u, 5, f"c{i}")
    return agg.result()


def residuals(cfg, state, updates, start, clean_sum, m):
    """What the round added beyond start + clean_sum / m, over every uploaded value, flat."""
    new = aggregate(cfg, state, updates)
    return torch.cat([(new.tensors[k].double() - start[k].double() - clean_sum[k] / m).flatten() for k in updates[0]])


@pytest.fixture
def state64():
    cfg = dp_config()
    return get_strategy(cfg).initial_state(make_model(cfg, torch.float64))


@pytest.mark.parametrize("kw, message", [
    (dict(dp_noise_multiplier=-1.0), "dp_noise_multiplier must be a number >= 0"),
    (dict(dp_noise_multiplier=float("nan")), "dp_noise_multiplier must be a number >= 0"),
    (dict(dp_clip_norm=None), "DP without clipping"),
    (dict(dp_clip_norm=0.0), "dp_clip_norm must be a positive number"),
    (dict(dp_delta=0.0), "dp_delta must be in (0, 1)"),
    (dict(dp_delta=0.2), "not below 1 / dp_num_clients"),
    (dict(dp_target_epsilon=-2.0), "dp_target_epsilon must be a positive number"),
    (dict(dp_num_clients=None), "DP needs dp_num_clients"),
    (dict(clients_per_round=11), "the sampling rate must be at most 1"),
    (dict(weighting="samples"), "Set weighting='uniform'"),
    (dict(norm_outlier_factor=3.0), "under DP leave it None"),
    (dict(max_update_norm=5.0), "leave max_update_norm and clip_updates unset"),
    (dict(dp_mode="client", clip_updates=True, max_update_norm=5.0), "set clip_updates=False"),
    (dict(dp_mode="local"), "dp_mode must be one of"),
    (dict(dp_accountant="moments"), "dp_accountant must be one of"),
    (dict(strategy="hetlora"), "cannot run under client-level DP: It weighs each client"),
    (dict(strategy="flora"), "cannot run under client-level DP: It stacks"),
    (dict(strategy="fedex"), "cannot run under client-level DP: Its residual"),
    (dict(strategy="lora_fair"), "cannot run under client-level DP: Its correction"),
    (dict(strategy="flexlora"), "cannot run under client-level DP: It averages each client's product"),
])
def test_config_refuses_unsound_dp(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dp_config(**{"strategy": "fedit", **kw})


def test_central_mode_clips_with_the_aggregators_clipping():
    cfg = dp_config(dp_clip_norm=2.5)
    assert (cfg.max_update_norm, cfg.clip_updates) == (2.5, True)
    assert make_config("fedit").dp is False and dp_config().dp is True


def test_noise_has_the_claimed_std_and_zero_mean(state64):
    """sigma C / m on every uploaded value (m = 4 expected clients, 2 arrived), mean 0: over 300 seeded
    rounds of ~70 values each (21k draws) the sample std is within 3% (~4.5 standard errors, which are
    1 / sqrt(2n) relative) and the mean within 5 standard errors of 0."""
    sigma, C, m = 0.7, 1.3, 4
    cfg = dp_config(dp_noise_multiplier=sigma, dp_clip_norm=C)
    updates, start = changes(cfg, state64, seed=1)
    clean = {k: sum(u[k].double() - start[k].double() for u in updates) for k in updates[0]}
    assert all(change_norm(u, start) < C for u in updates)  # nothing clipped: the residual is the noise alone
    draws = torch.cat([residuals(dp_config(dp_noise_multiplier=sigma, dp_clip_norm=C, dp_seed=s), state64, updates, start, clean, m)
                       for s in range(300)])
    expected = sigma * C / m
    assert abs(draws.std().item() / expected - 1) < 0.03
    assert abs(draws.mean().item()) < 5 * expected / math.sqrt(draws.numel())
    assert stats.kstest(draws.numpy() / expected, "norm").pvalue > 1e-3  # Gaussian, not only its moments


def test_noise_is_fresh_each_round_and_from_the_os(state64):
    cfg = dp_config()
    updates, _ = changes(cfg, state64, seed=2)
    a, b = aggregate(cfg, state64, updates), aggregate(cfg, state64, updates)
    key = next(iter(updates[0]))
    assert not torch.equal(a.tensors[key], b.tensors[key])  # no seed: the OS draws each time
    seeded = dp_config(dp_seed=3)
    assert torch.equal(aggregate(seeded, state64, updates).tensors[key], aggregate(seeded, state64, updates).tensors[key])
    g0, g1 = privacy.generator(seeded, 0, "aggregator"), privacy.generator(seeded, 1, "aggregator")
    assert not torch.equal(torch.randn(50, generator=g0), torch.randn(50, generator=g1))  # fresh per round, too


def test_clipping_comes_before_the_noise(state64):
    """global = start + (clip(d1) + d2 + z) / m, with z read off a round with no client (same seed)."""
    cfg, m = dp_config(dp_seed=11, dp_clip_norm=0.5), 4
    (big, small), start = changes(cfg, state64, seed=4, n=2)
    big = {k: start[k] + 40 * (v - start[k]) for k, v in big.items()}
    norm = change_norm(big, start)
    assert norm > 0.5 > change_norm(small, start)
    new = aggregate(cfg, state64, [big, small])
    z = {k: m * (v - start[k]) for k, v in aggregate(cfg, state64, []).tensors.items() if k in big}
    clipped = clip_change(big, start, norm, 0.5)
    for k in big:
        expected = start[k] + (clipped[k] - start[k] + small[k] - start[k] + z[k]) / m
        torch.testing.assert_close(new.tensors[k], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("strategy, frozen", [("ffa", "lora_A"), ("rolora", "lora_A")])
def test_noise_enters_only_uploaded_factors(strategy, frozen, state64):
    """FFA's frozen A and RoLoRA's resting factor stay bit for bit; the factor clients upload is noised."""
    cfg = dp_config(strategy, dp_noise_multiplier=2.0)
    state = get_strategy(cfg).initial_state(make_model(cfg, torch.float64))
    updates, _ = changes(cfg, state, seed=5)
    new = aggregate(cfg, state, updates)
    for module in state.modules():
        assert torch.equal(new.tensors[lora_key(module, frozen)], state.tensors[lora_key(module, frozen)])
        assert not torch.equal(new.tensors[lora_key(module, "lora_B")], state.tensors[lora_key(module, "lora_B")])


def test_fedsvd_refactors_the_noised_mean():
    """FedSVD under DP: the noise enters the mean of B; the refactoring after it keeps the product."""
    plain = dp_config("fedsvd", dp_seed=5, fedsvd_period=1000)  # no refactoring in round 1
    state = get_strategy(plain).initial_state(make_model(plain, torch.float64))
    updates, _ = changes(plain, state, seed=10)
    kept, refactored = aggregate(plain, state, updates), aggregate(dp_config("fedsvd", dp_seed=5, fedsvd_period=1), state, updates)
    for module in state.modules():
        a, b = lora_key(module, "lora_A"), lora_key(module, "lora_B")
        assert torch.equal(kept.tensors[a], state.tensors[a])
        torch.testing.assert_close(refactored.tensors[b] @ refactored.tensors[a], kept.tensors[b] @ kept.tensors[a])


def test_client_mode_total_noise_matches_central(state64):
    """m clients each adding sigma C / sqrt(m), or 2 of 4 with the aggregator's top-up: the round's noise
    has central mode's distribution (two-sample KS, and std within 4%)."""
    sigma, C, m = 0.8, 1.0, 4
    central, client_all, client_half = [], [], []
    updates, start = changes(dp_config(), state64, seed=6, n=m)
    for s in range(150):
        for mode, n, out in (("central", m, central), ("client", m, client_all), ("client", 2, client_half)):
            cfg = dp_config(dp_noise_multiplier=sigma, dp_clip_norm=C, dp_seed=s, dp_mode=mode)
            sent = updates[:n] if mode == "central" else [privacy.privatize_update(u, start, cfg, 0, f"c{i}") for i, u in enumerate(updates[:n])]
            clean = {k: sum(u[k].double() - start[k].double() for u in updates[:n]) for k in updates[0]}
            out.append(residuals(cfg, state64, sent, start, clean, m))
    central, client_all, client_half = (torch.cat(x).numpy() for x in (central, client_all, client_half))
    for other in (client_all, client_half):
        assert stats.ks_2samp(central, other).pvalue > 1e-3
    for out in (central, client_all, client_half):
        assert abs(out.std() / (sigma * C / m) - 1) < 0.04


def test_client_side_upload_is_clipped_then_noised(state64):
    cfg = dp_config(dp_mode="client", dp_noise_multiplier=0.0, dp_clip_norm=0.1)
    (update,), start = changes(cfg, state64, seed=7, n=1, scale=1.0)
    sent = privacy.privatize_update(update, start, cfg, 0, "c0")
    assert change_norm(sent, start) == pytest.approx(0.1, rel=1e-9)  # sigma 0: exactly the clipped change
    noisy = privacy.privatize_update(update, start, dp_config(dp_mode="client", dp_noise_multiplier=3.0, dp_clip_norm=0.1), 0, "c0")
    assert change_norm(noisy, start) > 3 * 0.1  # the aggregator never sees the clean change


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_is_dp_accountings_own(accountant):
    q, sigma, rounds, delta = 0.3, 1.1, 25, 1e-4
    make = dp_accounting.rdp.RdpAccountant if accountant == "rdp" else dp_accounting.pld.PLDAccountant
    theirs = make().compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds).get_epsilon(delta)
    cfg = make_config("fedit", weighting="uniform", dp_clip_norm=1.0, dp_noise_multiplier=sigma, dp_num_clients=10,
                      clients_per_round=3, dp_delta=delta, dp_accountant=accountant)
    plan = privacy.PrivacyPlan.of(cfg)
    assert (plan.sampling_rate, plan.expected_clients) == (q, 3)
    assert plan.epsilon(rounds) == pytest.approx(theirs, rel=1e-12)


def test_published_reference_values():
    # q = 0.01, sigma = 1, 1000 rounds, delta = 1e-5 (the reference values in ALGORITHMS.md, computed with dp-accounting)
    assert privacy.epsilon(0.01, 1.0, 1000, 1e-5, "rdp") == pytest.approx(2.101, abs=1e-3)
    assert privacy.epsilon(0.01, 1.0, 1000, 1e-5, "pld") == pytest.approx(1.828, abs=1e-3)
    # dp-accounting's own test (test_compute_epsilon_delta_gaussian): sigma 4.530877117 is exactly (1, 1e-6)-DP for one
    # unsampled Gaussian round by RDP; the default order grid reproduces it to 1e-6.
    assert privacy.epsilon(1.0, 4.530877117, 1, 1e-6, "rdp") == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_target_epsilon_is_met(accountant):
    cfg = dp_config(dp_noise_multiplier=None, dp_target_epsilon=4.0, num_rounds=10, dp_accountant=accountant)
    plan = privacy.PrivacyPlan.of(cfg)
    assert 3.95 < plan.epsilon(10) <= 4.0  # at the target, not needlessly below it
    plan.check_budget(10)
    with pytest.raises(privacy.PrivacyBudgetSpentError, match="publishing round 11 would take epsilon"):
        plan.check_budget(11)


def test_budget_stops_the_simulation(tmp_path):
    """sigma given, a budget between epsilon(2) and epsilon(3): rounds 1 and 2 are published with their
    epsilon, then the federation stops; no round carries a per-client number."""
    from tiny import tiny_args, tiny_bert, tiny_config, token_dataset

    from peft_federated.trainer import run_simulation

    kw = dict(weighting="uniform", dp_clip_norm=0.5, dp_noise_multiplier=1.0, dp_num_clients=3, clients_per_round=2,
              dp_delta=1e-3, dp_seed=0, num_rounds=5, local_steps=2)
    probe = privacy.PrivacyPlan.of(tiny_config("fedit", **kw))
    budget = (probe.epsilon(2) + probe.epsilon(3)) / 2
    cfg = tiny_config("fedit", dp_target_epsilon=budget, **kw)
    model = tiny_bert(cfg)
    data = {f"c{i}": token_dataset(12, i) for i in range(3)}
    result = run_simulation(model, cfg, data, tiny_args(tmp_path), tmp_path / "store", progress=False)
    assert [h["round"] for h in result.history] == [0, 1, 2]
    for h in result.history:
        assert h["dp"]["epsilon"] == pytest.approx(probe.epsilon(h["round"]))
        assert h["contributions"] == [] and not any(k.startswith("clients_mean") for k in h["metrics"])
    card = (result.store.round_folder(2) / "README.md").read_text()
    assert f"epsilon {probe.epsilon(2):.4g} at delta 0.001** after 2 rounds" in card
    # evaluating every 5 rounds still scores round 2, the last the budget allows
    scored = []
    result = run_simulation(tiny_bert(cfg), cfg, data, tiny_args(tmp_path / "every"), tmp_path / "every-store",
                            progress=False, eval_every=5, evaluate_fn=lambda m: scored.append(1) or {"score": len(scored)})
    assert [h["round"] for h in result.history if h["metrics"]] == [0, 2] and result.final_metrics == {"score": 2.0}
    with pytest.raises(ValueError, match="dp_num_clients=3 but 2 client datasets"):
        run_simulation(model, cfg, dict(list(data.items())[:2]), tiny_args(tmp_path), tmp_path / "other", progress=False)


def test_aggregator_role_under_dp(tmp_path):
    """The Hub roles under DP: ids only in contributions, the dp record, and the refusals of unsound setups."""
    from peft_federated.aggregator import aggregate_round, check_dp_roles, initialize
    from peft_federated.hub_integration import LocalStore

    cfg = make_config("fedit", weighting="uniform", dp_clip_norm=1.0, dp_noise_multiplier=1.0, dp_num_clients=3, dp_delta=1e-3)
    store = LocalStore(tmp_path / "fed")
    initialize(store, cfg, make_model(cfg))
    state, _ = store.read_round()
    updates, _ = changes(cfg, state, seed=8, n=3)
    for i, u in enumerate(updates):
        store.submit_update(0, f"c{i}", u, {"num_samples": 4, "metrics": {"train_loss": 0.5}, "base_round": 0})
    assert aggregate_round(store, cfg, ["c0", "c1", "c2"]) == 1
    meta = json.loads((store.round_folder(1) / "federation.json").read_text())
    assert meta["contributions"] == [{"client_id": "c0"}, {"client_id": "c1"}, {"client_id": "c2"}]
    assert meta["metrics"] == {} and meta["dp"]["epsilon"] == pytest.approx(privacy.epsilon(1.0, 1.0, 1, 1e-3))
    with pytest.raises(ValueError, match="needs its 3 registered clients"):
        check_dp_roles(cfg, None)
    with pytest.raises(ValueError, match="set clients_per_round=1.0"):
        check_dp_roles(make_config("fedit", **{**DP, "dp_noise_multiplier": 1.0, "dp_num_clients": 3, "clients_per_round": 2}),
                       ["a", "b", "c"])


def test_sampled_round_without_a_valid_update_is_the_noise_alone(tmp_path):
    """Under DP with sampling (the Flower strategy) every round is published, as run_simulation does: one
    with no update, or only refused ones, is start + z / m; refusals are counted, never named."""
    from peft_federated.aggregator import aggregate_round, initialize
    from peft_federated.hub_integration import LocalStore

    cfg = make_config("fedit", **{**DP, "dp_noise_multiplier": 2.0, "dp_num_clients": 3, "clients_per_round": 2, "dp_seed": 5})
    clients, plan = ["c0", "c1", "c2"], privacy.PrivacyPlan.of(cfg)
    published = {}
    for case in ("none", "refused"):
        store = LocalStore(tmp_path / case)
        initialize(store, cfg, make_model(cfg))
        start, _ = store.read_round()
        if case == "refused":
            (good,), _ = changes(cfg, start, seed=3, n=1)
            store.submit_update(0, "intruder", good, {"num_samples": 4, "metrics": {}, "base_round": 0})
            store.submit_update(0, "c1", {k: v * float("nan") for k, v in good.items()}, {"num_samples": 4, "metrics": {}, "base_round": 0})
        assert aggregate_round(store, cfg, clients, sampled=True) == 1
        published[case], meta = store.read_round(1)
        assert meta["contributions"] == [] and meta["refused"] == []
        assert meta["refused_count"] == (2 if case == "refused" else 0)
        assert "c1" not in json.dumps(meta) and "intruder" not in json.dumps(meta)
        assert meta["dp"]["epsilon"] == pytest.approx(privacy.epsilon(plan.sampling_rate, 2.0, 1, 1e-3))
    uploaded = [lora_key(m, f) for m in start.modules() for f in get_strategy(cfg).trainable_factors(0)] + list(start.extra_keys())
    noise = torch.cat([(published["none"].tensors[k].double() - start.tensors[k].double()).flatten() for k in uploaded])
    assert noise.abs().min() > 0 and stats.kstest(noise.numpy() * plan.expected_clients / (2.0 * 1.0), "norm").pvalue > 1e-3
    for k in start.tensors:  # the refused updates left no trace: the same noise alone (seeded), bit for bit
        assert torch.equal(published["refused"].tensors[k], published["none"].tensors[k])


def test_client_side_mode_through_trainers_and_the_aggregator_role(tmp_path):
    """Real FederatedTrainer clients in client-side mode: every stored upload is already noised (its
    change is far above C), and the published rounds carry the epsilon."""
    from tiny import federate, tiny_config

    from peft_federated.strategies import get_strategy

    C = 0.05
    cfg = tiny_config("ffa", weighting="uniform", dp_mode="client", dp_clip_norm=C, dp_noise_multiplier=4.0, dp_num_clients=2,
                      dp_delta=1e-3, num_rounds=2, local_steps=2)
    store, trainers, outputs = federate(tmp_path, cfg)
    assert store.latest_round() == 2 and set(outputs) == {"alice", "bob"}
    strategy = get_strategy(cfg)
    for rnd in range(2):
        state, meta = store.read_round(rnd)
        for client in ("alice", "bob"):
            update, _ = store.read_update(rnd, client)
            assert change_norm(update, strategy.client_start(state, client, cfg.r)) > 5 * C
    _, last = store.read_round(2)
    assert last["dp"]["mode"] == "client" and last["dp"]["epsilon"] == pytest.approx(privacy.epsilon(1.0, 4.0, 2, 1e-3))
    assert last["contributions"] == [{"client_id": "alice"}, {"client_id": "bob"}]


def test_no_noise_publishes_strict_json(tmp_path):
    """sigma 0 (clipping only) has no guarantee: epsilon is null in federation.json, and the card says so."""
    from peft_federated.aggregator import initialize
    from peft_federated.hub_integration import LocalStore

    cfg = make_config("fedit", **{**DP, "dp_noise_multiplier": 0.0})
    store = LocalStore(tmp_path / "fed")
    initialize(store, cfg, make_model(cfg))
    state, _ = store.read_round()
    updates, _ = changes(cfg, state, seed=9)
    store.publish_round(aggregate(cfg, state, updates), cfg, privacy.published_metadata(cfg, 1, {"contributions": [], "metrics": {}}, False))
    _, meta = store.read_round(1)
    assert meta["dp"]["epsilon"] is None
    assert "epsilon infinite (no noise)" in (store.round_folder(1) / "README.md").read_text()

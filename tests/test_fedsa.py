"""FedSA-LoRA: the invariants of ../shared/ALGORITHMS.md on random non-square factors (float32 and
float64, references computed here by hand), local training with each client's own B end to end with
every published round loaded by plain PEFT (the shared part) and each client's personal part loaded
over it, hostile uploads refused with their reasons, and DP noise on A alone.

Streaming and file aggregation are the shared tests (test_invariants, test_accept_files), which run
fedsa with what it uploads.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tol
from helpers import MODULES, TinyNet, client_data, make_config, make_model, train_locally
from peft import PeftModel
from safetensors.torch import save as save_bytes
from test_flexlora_fedsvd import LocalFederation, with_nan
from test_hostile_updates import assert_published, honest, record_for, upload_raw
from test_hub_store import random_payload
from test_invariants import SHAPES, random_state, random_update, random_upload
from test_privacy import dp_config

from peft_federated import STRATEGIES, get_strategy, load_personal
from peft_federated.adapter import effective_weight, read_tensors
from peft_federated.hub_integration import write_round
from peft_federated.personal import write_personal
from peft_federated.state import lora_key
from peft_federated.strategies.validation import change_norm, clip_change

R = 3
SAMPLES = [3, 11, 6]
HEAD = "base_model.model.head.weight"  # random_state's extra tensor (a head: personal under fedsa)


def p_of(samples):
    return [n / sum(samples) for n in samples]


def fedsa(**kw):
    return get_strategy(make_config("fedsa", r=R, **kw))


def mean_A(ups, p, m):
    """sum_k p_k A_k, by hand, in float64."""
    return sum(pk * u[lora_key(m, "lora_A")].double() for pk, u in zip(p, ups))


def test_b_and_the_head_are_personal_and_only_a_is_uploaded(dtype):
    s = fedsa()
    model = make_model(s.config, dtype)
    state = s.initial_state(model)
    assert s.personalized and s.dp_refusal is None
    assert all(s.trainable_factors(t) == ("lora_A", "lora_B") and s.shared_factors(t) == ("lora_A",) for t in range(4))
    personal = [lora_key(m, "lora_B") for m in MODULES] + ["base_model.model.head.weight", "base_model.model.head.bias"]
    assert sorted(s.personal_keys(state)) == sorted(personal) and s.shared_extra_keys(state) == []
    client_round = s.prepare_client(model, state, "c0")
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(any(f"{m}.{f}" in n for n in trains) for m in MODULES for f in ("lora_A", "lora_B"))
    assert any("head" in n for n in trains)
    train_locally(client_round, *client_data(1, 9, dtype))
    payload, kept = client_round.payload(), client_round.personal()
    assert sorted(payload) == sorted(lora_key(m, "lora_A") for m in MODULES)
    assert sorted(kept) == sorted(personal)
    assert all(torch.count_nonzero(kept[lora_key(m, "lora_B")]) > 0 for m in MODULES)  # B trained, from 0
    assert not torch.equal(kept["base_model.model.head.weight"], state.tensors["base_model.model.head.weight"])
    # nothing is personal under any other strategy
    for name in STRATEGIES:
        if name != "fedsa":
            other = get_strategy(make_config(name, r=R))
            assert not other.personalized and other.personal_keys(state) == []
            assert other.shared_extra_keys(state) == state.extra_keys()
            assert all(other.shared_factors(t) == other.trainable_factors(t) for t in range(2))


def test_a_is_the_weighted_mean_and_b_and_the_head_keep_round_0(gen, dtype):
    s = fedsa()
    state = random_state(gen, dtype)
    ups = [random_upload(s, state, gen) for _ in SAMPLES]
    assert all(sorted(u) == sorted(lora_key(m, "lora_A") for m in SHAPES) for u in ups)
    new = s.aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, SAMPLES))])
    uniform = fedsa(weighting="uniform").aggregate(state, [(f"c{k}", u, n) for k, (u, n) in enumerate(zip(ups, SAMPLES))])
    for m in SHAPES:
        A = new.factor(m, "lora_A")
        assert A.dtype == dtype and A.shape == state.factor(m, "lora_A").shape and A.shape[0] != A.shape[1]
        torch.testing.assert_close(A.double(), mean_A(ups, p_of(SAMPLES), m), **tol(dtype))
        torch.testing.assert_close(uniform.factor(m, "lora_A").double(), mean_A(ups, [1 / 3] * 3, m), **tol(dtype))
        assert torch.equal(new.factor(m, "lora_B"), state.factor(m, "lora_B"))  # nobody uploads B
    assert torch.equal(new.tensors[HEAD], state.tensors[HEAD])
    assert new.round == state.round + 1 and new.base_delta == {}


def test_one_client_leaves_a_as_its_own(gen, dtype):
    s = fedsa()
    state = random_state(gen, dtype)
    (up,) = [random_upload(s, state, gen)]
    new = s.aggregate(state, [("only", up, 17)])
    for m in SHAPES:
        assert torch.equal(new.factor(m, "lora_A"), up[lora_key(m, "lora_A")])


def test_client_order_does_not_change_the_result(gen, dtype):
    s = fedsa()
    state = random_state(gen, dtype)
    ups = {f"c{k}": (random_upload(s, state, gen), n) for k, n in enumerate(SAMPLES)}
    results = [s.aggregate(state, [(c, *ups[c]) for c in order]) for order in itertools.permutations(ups)]
    for other in results[1:]:
        for key in state.tensors:
            torch.testing.assert_close(other.tensors[key], results[0].tensors[key], **tol(dtype))


def published(folder, dtype):
    torch.manual_seed(0)
    return PeftModel.from_pretrained(TinyNet().to(dtype), folder)


def test_local_training_end_to_end_each_client_keeps_its_b(tmp_path, dtype):
    """Three rounds of real optimizer steps on TinyNet, each client's personal tensors kept apart. After
    each aggregation: A = sum p_k A_k of the trained factors; every client starts from that same A and
    from exactly the B and head it ended its last round with (a client yet to train: B = 0 and round 0's
    head); the published round loads with plain PEFT as W0 + s B0 A = W0, and `load_personal` over it
    gives the client's model: W0 + s B_k A, with the client's outputs."""
    samples = {"c0": 12, "c1": 30, "c2": 7}
    rounds_of = {"c0": [0, 1, 2], "c1": [0, 2], "c2": [1, 2]}  # c1 misses round 1, c2 joins late
    s, model = fedsa(), make_model(make_config("fedsa", r=R), dtype)
    state = s.initial_state(model)
    w0 = {m: effective_weight(published(write_round(tmp_path / "round-0000", state, s.config), dtype), m) for m in MODULES}
    head0 = {k: v for k, v in state.tensors.items() if "head" in k}
    personal: dict[str, dict] = {}
    for rnd in range(3):
        trained, uploads = {}, {}
        for k, client in enumerate(c for c in samples if rnd in rounds_of[c]):
            client_round = s.prepare_client(model, state, client, personal=personal.get(client))
            start = read_tensors(model)
            for key in s.personal_keys(state):  # its own B and head, bit for bit, or the shared model's
                want = personal[client][key] if client in personal else state.tensors[key]
                assert torch.equal(start[key], want), (client, key)
            assert client in personal or all(torch.count_nonzero(start[lora_key(m, "lora_B")]) == 0 for m in MODULES)
            train_locally(client_round, *client_data(100 * rnd + k, samples[client], dtype))
            trained[client], uploads[client] = read_tensors(model), client_round.payload()
            personal[client] = client_round.personal()
            assert all(torch.equal(personal[client][key], trained[client][key]) for key in personal[client])
            assert not any("lora_B" in key or "head" in key for key in uploads[client])
        new = s.aggregate(state, [(c, uploads[c], samples[c]) for c in uploads])
        p = p_of([samples[c] for c in uploads])
        for m in MODULES:
            want = sum(pk * trained[c][lora_key(m, "lora_A")].double() for pk, c in zip(p, uploads))
            torch.testing.assert_close(new.factor(m, "lora_A").double(), want, **tol(dtype))
            assert torch.count_nonzero(new.factor(m, "lora_B")) == 0
        assert all(torch.equal(new.tensors[k], v) for k, v in head0.items())
        folder = write_round(tmp_path / f"round-{rnd + 1:04d}", new, s.config)
        shared = published(folder, dtype)
        x = client_data(999, 5, dtype)[0]
        for m in MODULES:
            torch.testing.assert_close(effective_weight(shared, m), w0[m], **tol(dtype))  # B = 0: the shared part alone
        for client in personal:
            write_personal(tmp_path / "personal" / client, rnd + 1, personal[client], s, client)
            mine = published(folder, dtype)
            assert load_personal(mine, tmp_path / "personal" / client)["round"] == rnd + 1
            s.prepare_client(model, new, client, personal=personal[client]).close()
            with torch.no_grad():
                torch.testing.assert_close(mine(x), model(x), **tol(dtype))
            for m in MODULES:
                B, A = personal[client][lora_key(m, "lora_B")].double(), new.factor(m, "lora_A").double()
                torch.testing.assert_close(effective_weight(mine, m), w0[m] + s.config.scaling * B @ A, **tol(dtype))
        state = new
    assert not torch.equal(personal["c0"][lora_key("up", "lora_B")], personal["c1"][lora_key("up", "lora_B")])


# ---- hostile uploads ------------------------------------------------------------------------------

def _B(state, model):
    """Every module's lora_B and the model's head: what a client keeps, as a hostile one might upload it."""
    tensors = read_tensors(model)
    return {k: torch.randn_like(tensors[k]) for k in get_strategy(make_config("fedsa", r=2)).personal_keys(state)}


HOSTILE = {  # case -> (mallory's tensors from her honest payload and her personal tensors, reason)
    "lora_B uploaded too": (lambda p, mine: {**p, **{k: v for k, v in mine.items() if "lora_B" in k}}, "holds personal tensors"),
    "the head uploaded too": (lambda p, mine: {**p, **{k: v for k, v in mine.items() if "head" in k}}, "holds personal tensors"),
    "lora_B instead of lora_A": (lambda p, mine: {k: v for k, v in mine.items() if "lora_B" in k}, "holds personal tensors"),
    "everything": (lambda p, mine: {**p, **mine}, "Upload only lora_A."),
    "lora_A missing": (lambda p, mine: dict(list(p.items())[:1]), "missing tensors"),
    "wrong rank": (lambda p, mine: {k: v[:1].contiguous() for k, v in p.items()}, "its rank must be in [2, 2]"),
    "NaN in lora_A": (lambda p, mine: with_nan(p, "lora_A"), "NaN or Inf"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_a_hostile_upload_is_refused_with_its_reason_and_the_others_are_published(tmp_path, case):
    make, reason = HOSTILE[case]
    fed = LocalFederation(tmp_path, make_config("fedsa", r=2))
    good = {"alice": honest(fed, "alice", 1), "bob": honest(fed, "bob", 2)}
    state, _ = fed.store.read_round(0)
    weights = save_bytes(make(random_payload(fed.cfg, state, fed.model, "mallory", 3), _B(state, fed.model)))
    upload_raw(fed, "mallory", weights, record_for(fed, "mallory", weights))
    meta = assert_published(fed, good, {"mallory": reason})
    published_state, _ = fed.store.read_round(1)
    for key in get_strategy(fed.cfg).personal_keys(state):  # nothing of hers (or anyone's) reached B or the head
        assert torch.equal(published_state.tensors[key], state.tensors[key])
    assert len(meta["contributions"]) == 2


def test_streamed_refusal_of_personal_tensors_changes_nothing(gen, dtype):
    s = fedsa()
    state = random_state(gen, dtype)
    agg = s.aggregator(state)
    good = random_upload(s, state, gen)
    agg.accept(good, 4, "c0")
    with pytest.raises(Exception, match="holds personal tensors .*lora_B.*each client keeps them"):
        agg.accept(random_update(state, gen), 4, "c1")  # A, B and the head
    assert list(agg.clients) == ["c0"]
    new = agg.result()
    for m in SHAPES:
        assert torch.equal(new.factor(m, "lora_A"), good[lora_key(m, "lora_A")])


# ---- DP -------------------------------------------------------------------------------------------

def test_under_dp_only_a_is_clipped_and_noised():
    """global A = A0 + (clip(d1) + d2 + z) / m, with z read off a round with no client (same seed);
    B and the head (personal, never uploaded) stay bit for bit round 0's: no noise enters them."""
    cfg, m = dp_config("fedsa", dp_seed=11, dp_clip_norm=0.5), 4
    s = get_strategy(cfg)
    state = s.initial_state(make_model(cfg, torch.float64))
    start = s.client_start(state, "x", cfg.r)
    g = torch.Generator().manual_seed(3)
    keys = [lora_key(mod, "lora_A") for mod in state.modules()]
    big, small = ({k: start[k] + scale * torch.randn(start[k].shape, generator=g, dtype=torch.float64) for k in keys}
                  for scale in (2.0, 0.01))
    norm = change_norm(big, start)
    assert norm > 0.5 > change_norm(small, start)
    new = s.aggregate(state, [("c0", big, 5), ("c1", small, 5)])
    z = {k: m * (v - start[k]) for k, v in s.aggregator(state).result().tensors.items() if k in keys}
    assert all(float(torch.linalg.norm(v)) > 0 for v in z.values())
    clipped = clip_change(big, start, norm, 0.5)
    for k in keys:
        torch.testing.assert_close(new.tensors[k], start[k] + (clipped[k] - start[k] + small[k] - start[k] + z[k]) / m,
                                   rtol=1e-12, atol=1e-12)
    for k in s.personal_keys(state):
        assert torch.equal(new.tensors[k], state.tensors[k]), k


def test_a_client_given_personal_tensors_that_are_not_its_part_is_refused(dtype):
    s = fedsa()
    model = make_model(s.config, dtype)
    state = s.initial_state(model)
    client_round = s.prepare_client(model, state, "c0")
    mine = client_round.personal()
    shared = client_round.payload()
    for wrong in ({**mine, **shared}, {k: v for k, v in mine.items() if "head" not in k}):
        with pytest.raises(ValueError, match="not this federation's personal part"):
            s.prepare_client(model, state, "c0", personal=wrong)

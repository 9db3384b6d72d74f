"""Bad updates and corrupt round files: a precise error, and nothing from them is aggregated."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_config, make_model

from peft_federated import InvalidUpdateError, get_strategy
from peft_federated.hub_integration import CorruptRoundError, read_round, write_round
from peft_federated.state import lora_key


@pytest.fixture
def setup(gen):
    cfg = make_config("fedit", r=3)
    s = get_strategy(cfg)
    model = make_model(cfg)
    state = s.initial_state(model)
    good = {k: torch.randn(v.shape, generator=gen) for k, v in s.prepare_client(model, state, "c0").payload().items()}
    return s, state, good


def mutate(update, key, value):
    out = dict(update)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


A_UP, B_UP = lora_key("up", "lora_A"), lora_key("up", "lora_B")


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda u: mutate(u, A_UP, torch.full_like(u[A_UP], float("nan"))), "holds NaN or Inf"),
        (lambda u: mutate(u, B_UP, torch.full_like(u[B_UP], float("inf"))), "holds NaN or Inf"),
        (lambda u: mutate(u, A_UP, None), "missing tensors"),
        (lambda u: mutate(u, "base_model.model.evil.lora_A.weight", torch.zeros(3, 7)), "unexpected tensors"),
        (lambda u: mutate(u, A_UP, u[A_UP].T.contiguous()), "rank must be in [3, 3]"),
        (lambda u: mutate(u, A_UP, torch.zeros(5, 7)), "rank must be in [3, 3]"),
        (lambda u: mutate(u, A_UP, torch.zeros(3, 6)), "expected (3, 7)"),
        (lambda u: mutate(u, A_UP, u[A_UP].double()), "dtype torch.float64"),
        (lambda u: mutate(u, "base_model.model.head.weight", torch.zeros(2, 4)), "expected (2, 3)"),
        (lambda u: mutate(u, A_UP, [[0.0]]), "not a tensor"),
    ],
)
def test_bad_update_is_refused_and_changes_nothing(setup, change, message):
    s, state, good = setup
    agg = s.aggregator(state)
    agg.accept(good, 10, "c0")
    with pytest.raises(InvalidUpdateError) as err:
        agg.accept(change(good), 10, "c1")
    assert message in str(err.value) and "'c1'" in str(err.value) and "round 0" in str(err.value)
    assert "c1" not in agg.clients
    result = agg.result()  # the good update alone
    for key, value in good.items():
        torch.testing.assert_close(result.tensors[key], value)


def test_same_client_counts_once_and_bad_counts_are_refused(setup):
    s, state, good = setup
    agg = s.aggregator(state)
    agg.accept(good, 10, "c0")
    with pytest.raises(ValueError, match="already contributed to round 0"):
        agg.accept(good, 10, "c0")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_samples must be a positive integer"):
            agg.accept(good, bad, "c9")
    assert list(agg.clients) == ["c0"]


def test_frozen_factor_in_upload_is_refused(setup, gen):
    cfg = make_config("ffa", r=3)
    s = get_strategy(cfg)
    _, state, good = setup
    with pytest.raises(InvalidUpdateError, match="this round uploads only lora_B"):
        s.aggregator(state).accept(good, 3, "c0")


def test_empty_round_cannot_be_aggregated(setup):
    s, state, _ = setup
    with pytest.raises(ValueError, match="no client update was accepted"):
        s.aggregator(state).result()


@pytest.fixture
def round_folder(tmp_path, setup):
    s, state, _ = setup
    write_round(tmp_path, state, s.config)
    return tmp_path


def test_truncated_safetensors_is_a_clear_error(round_folder):
    path = round_folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CorruptRoundError, match="not a readable safetensors file.*truncated"):
        read_round(round_folder)


def test_garbage_safetensors_is_a_clear_error(round_folder):
    (round_folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CorruptRoundError, match="not a readable safetensors file"):
        read_round(round_folder)


@pytest.mark.parametrize(
    "content,message",
    [("{", "is not valid JSON"), (json.dumps({"round": "x", "rank": 3, "strategy": "fedit"}), "field 'round'"),
     (json.dumps({"round": 1, "rank": 3, "strategy": "fedit", "format_version": 99}), "upgrade peft-federated")],
)
def test_malformed_metadata_is_a_clear_error(round_folder, content, message):
    (round_folder / "federation.json").write_text(content)
    with pytest.raises(CorruptRoundError, match=message):
        read_round(round_folder)


def test_missing_round_files(tmp_path):
    with pytest.raises(CorruptRoundError, match="not a published round"):
        read_round(tmp_path)


def test_model_built_with_another_rank_is_refused(setup):
    s, state, _ = setup
    other = make_model(make_config("fedit", r=2))
    with pytest.raises(ValueError, match="LoRA rank is 2 but the federation's r is 3"):
        s.prepare_client(other, state, "c0")


def _norm_setup(gen, strategy="fedit", **kw):
    cfg = make_config(strategy, r=3, **kw)
    s = get_strategy(cfg)
    model = make_model(cfg)
    state = s.initial_state(model)
    payload = s.prepare_client(model, state, "c0").payload()
    start = {k: state.tensors[k] for k in payload}

    def update(scale):  # a change of norm exactly `scale` in a random direction
        direction = {k: torch.randn(v.shape, generator=gen) for k, v in start.items()}
        size = sum(float((d.double() ** 2).sum()) for d in direction.values()) ** 0.5
        return {k: start[k] + direction[k] * (scale / size) for k in start}

    return s, state, start, update


def test_update_above_the_norm_bound_is_refused_others_kept(gen):
    s, state, _, update = _norm_setup(gen, max_update_norm=2.0)
    small, big = update(1.5), update(40.0)
    agg = s.aggregator(state)
    agg.accept(small, 10, "c0")
    with pytest.raises(InvalidUpdateError, match=r"L2 norm 40, above max_update_norm=2\.") as err:
        agg.accept(big, 10, "c1")
    assert "'c1'" in str(err.value)
    assert list(agg.clients) == ["c0"] and agg.clients["c0"]["norm"] == pytest.approx(1.5, rel=1e-6)
    result = agg.result()
    reference = s.aggregate(state, [("c0", small, 10)])
    for k in result.tensors:
        torch.testing.assert_close(result.tensors[k], reference.tensors[k])


def test_clipping_scales_the_change_down_to_the_bound(gen):
    s, state, start, update = _norm_setup(gen, max_update_norm=2.0, clip_updates=True)
    small, big = update(1.0), update(8.0)
    agg = s.aggregator(state)
    agg.accept(small, 30, "c0")
    agg.accept(big, 10, "c1")
    assert agg.clients["c1"]["clipped"] and not agg.clients["c0"]["clipped"]
    result = agg.result()
    # hand-computed: the clipped update is start + (big - start) / 4; FedIT averages weighted 3:1
    for k in small:
        clipped = start[k] + (big[k] - start[k]) * 0.25
        torch.testing.assert_close(result.tensors[k], (0.75 * small[k].double() + 0.25 * clipped.double()).float())


def test_norm_of_a_lower_rank_update_is_taken_from_its_truncated_start(gen):
    # HetLoRA: a client at rank 2 is measured against the global factors truncated to rank 2.
    s, state, _, _ = _norm_setup(gen, "hetlora", client_ranks={"c0": 2}, max_update_norm=1e-9)
    agg = s.aggregator(state)
    model = make_model(s.config)
    unchanged = s.prepare_client(model, state, "c0").payload()
    agg.accept(unchanged, 5, "c0")  # no change at all: norm 0, under any bound
    assert agg.clients["c0"]["norm"] == 0.0 and agg.clients["c0"]["rank"] == 2


@pytest.mark.parametrize("kw,message", [
    ({"max_update_norm": -1.0}, "max_update_norm must be a positive number"),
    ({"norm_outlier_factor": 0.5}, "norm_outlier_factor must be > 1"),
    ({"clip_updates": True}, "clip_updates=True needs max_update_norm"),
    ({"max_update_bytes": 0}, "max_update_bytes must be a positive integer"),
])
def test_bad_norm_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        make_config("fedit", **kw)

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

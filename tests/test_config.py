"""FederatedLoraConfig: checked when built, and published as a plain LoraConfig."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from helpers import TinyNet, make_config, make_model
from peft import LoraConfig, PeftModel

from peft_federated import FederatedLoraConfig, get_strategy
from peft_federated.hub_integration import write_round


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"strategy": "fedavg"}, "choose one of: fedex, fedit, fedsa, fedsvd, ffa, flexlora, flora, hetlora, lora_fair, rolora"),
        ({"r": 4, "client_ranks": {"a": 5}}, "client_ranks['a'] = 5 must be an integer in [1, r=4]"),
        ({"client_ranks": {"a": 0}}, "must be an integer in [1"),
        ({"num_rounds": 0}, "num_rounds must be a positive integer"),
        ({"clients_per_round": 0}, "clients_per_round must be a positive integer"),
        ({"clients_per_round": 1.5}, "as a float is a fraction and must be in (0, 1]"),
        ({"local_steps": -3}, "local_steps must be a positive integer"),
        ({"local_steps": None}, "exactly one of local_steps and local_epochs"),
        ({"local_epochs": 1.0}, "exactly one of local_steps and local_epochs"),
        ({"weighting": "size"}, "weighting must be one of"),
        ({"hetlora_gamma": 0.0}, "hetlora_gamma must be in (0, 1]"),
        ({"hetlora_min_rank": 9}, "hetlora_min_rank must be in [1, r=8]"),
        ({"lora_fair_lambda": -1.0}, "lora_fair_lambda must be >= 0"),
        ({"lora_fair_steps": 0}, "lora_fair_steps must be a positive integer"),
        ({"rank_pattern": {"q": 2}}, "rank_pattern/alpha_pattern are not supported"),
    ],
)
def test_bad_settings_raise_errors_that_say_what_to_do(kwargs, message):
    with pytest.raises(ValueError) as err:
        FederatedLoraConfig(target_modules=["q"], **kwargs)
    assert message in str(err.value)


def test_every_federation_field_has_help_text():
    import dataclasses

    lora = {f.name for f in dataclasses.fields(LoraConfig)}
    for f in dataclasses.fields(FederatedLoraConfig):
        if f.name not in lora:
            assert f.metadata.get("help"), f"{f.name} has no help text"


def test_clients_per_round_count_or_fraction():
    assert FederatedLoraConfig(clients_per_round=3).num_sampled(10) == 3
    assert FederatedLoraConfig(clients_per_round=30).num_sampled(10) == 10
    assert FederatedLoraConfig(clients_per_round=0.25).num_sampled(10) == 2  # round(2.5) -> 2 (banker's)
    assert FederatedLoraConfig(clients_per_round=0.01).num_sampled(10) == 1
    assert FederatedLoraConfig(clients_per_round=1.0).num_sampled(10) == 10


def test_scaling_follows_peft(dtype):
    assert FederatedLoraConfig(r=4, lora_alpha=8).scaling == 2.0
    assert FederatedLoraConfig(r=4, lora_alpha=8, use_rslora=True).scaling == 4.0


@pytest.mark.parametrize("strategy", ["rolora", "fedex"])
def test_published_config_is_plain_lora_that_peft_loads_without_warnings(tmp_path, strategy, gen):
    cfg = make_config(strategy, r=2)
    model = make_model(cfg)
    s = get_strategy(cfg)
    state = s.initial_state(model)
    if strategy == "fedex":  # give the base a change so rank/alpha patterns are published too
        ups = []
        for k in range(2):
            cr = s.prepare_client(model, state, f"c{k}")
            ups.append((f"c{k}", {key: torch.randn(v.shape, generator=gen) for key, v in cr.payload().items()}, 3))
        state = s.aggregate(state, ups)
    write_round(tmp_path, state, cfg)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "strategy" not in saved and "num_rounds" not in saved
    assert set(saved) <= {f for f in LoraConfig().to_dict()} | {"peft_type", "task_type"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        loaded = PeftModel.from_pretrained(TinyNet(), tmp_path)
    assert type(loaded.peft_config["default"]) is LoraConfig

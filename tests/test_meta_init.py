"""The aggregator needs no base weights: round 0 from the model's config on the meta device.

Round 0 built that way must be the round 0 built from the real model: the LoRA factors (drawn from
`init_seed`) bit for bit, a head the checkpoint holds as its values, and a new head drawn from the
shared seed as every client reproduces it.
"""

from __future__ import annotations

import time

import psutil
import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from peft_federated import FederatedLoraConfig
from peft_federated.adapter import lora_layers
from peft_federated.hub_integration.store import LocalStore
from peft_federated.roles import load_base_model, start_aggregator
from peft_federated.skeleton import draw_modules_to_save, modules_to_save, skeleton_model
from peft_federated.strategies import get_strategy

LABELS = 3


def tiny_llama_config(**kw) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def lm_path(tmp_path_factory):
    """A causal-LM checkpoint: a SEQ_CLS federation on it gets a new head (`score`)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm") / "llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return str(path)


def fed_config(strategy: str = "rolora", task_type: str = "SEQ_CLS", init_seed: int = 0) -> FederatedLoraConfig:
    return FederatedLoraConfig(strategy=strategy, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                               task_type=task_type, num_rounds=2, init_seed=init_seed)


def todays_round0(path: str, config: FederatedLoraConfig, draw: bool):
    """Round 0 built from the whole model loaded (what the aggregator did before), the new head drawn from the seed."""
    model = get_peft_model(load_base_model(path, config.task_type, LABELS), config.to_lora_config())
    if draw:
        draw_modules_to_save(model, config.init_seed)
    return get_strategy(config).initial_state(model), model


def published_round0(path: str, config: FederatedLoraConfig, store_dir):
    store = LocalStore(store_dir)
    assert start_aggregator(store, config, path, LABELS) == 0
    return store.read_round(0)[0]


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def test_skeleton_holds_no_base_weight(lm_path):
    model = skeleton_model(lm_path, fed_config(), LABELS)
    heads = {id(p) for module in modules_to_save(model).values() for p in module.parameters()}
    real = [name for name, p in model.named_parameters() if not p.is_meta and id(p) not in heads]
    assert real == []  # every base weight and LoRA factor is on the meta device
    assert all(not p.is_meta for module in modules_to_save(model).values() for p in module.parameters())
    assert all(layer.get_base_layer().weight.is_meta for layer in lora_layers(model).values())


@pytest.mark.parametrize("strategy", ["rolora", "fedex", "hetlora"])
def test_round0_equals_todays_with_a_new_head_from_the_seed(strategy, lm_path, tmp_path):
    config = fed_config(strategy, init_seed=7)
    ours = published_round0(lm_path, config, tmp_path / "store")
    today, client = todays_round0(lm_path, config, draw=True)
    assert_same(ours.tensors, today.tensors)
    assert ours.strategy_state == today.strategy_state
    # A client draws the same head from the shared seed on its own real model; another seed draws another.
    head = "base_model.model.score.weight"
    client_head = modules_to_save(client)["score"].weight.detach()
    assert torch.equal(client_head, ours.tensors[head]) and client_head.abs().sum() > 0
    other = get_peft_model(load_base_model(lm_path, "SEQ_CLS", LABELS), fed_config(strategy, init_seed=8).to_lora_config())
    draw_modules_to_save(other, 8)
    assert not torch.equal(modules_to_save(other)["score"].weight, ours.tensors[head])
    # and a client starting the round holds round 0's head and factors exactly
    get_strategy(config).prepare_client(other, ours, "alice").close()
    assert torch.equal(modules_to_save(other)["score"].weight, ours.tensors[head])


def test_round0_reads_a_head_the_checkpoint_holds(tmp_path):
    torch.manual_seed(1)
    trained = LlamaForSequenceClassification(tiny_llama_config(num_labels=LABELS))
    trained.save_pretrained(tmp_path / "cls")
    config = fed_config("fedex")
    ours = published_round0(str(tmp_path / "cls"), config, tmp_path / "store")
    today, _ = todays_round0(str(tmp_path / "cls"), config, draw=False)
    assert_same(ours.tensors, today.tensors)
    assert torch.equal(ours.tensors["base_model.model.score.weight"], trained.score.weight.detach())


def test_round0_keeps_the_checkpoint_dtype(tmp_path):
    """A bfloat16 checkpoint: from_pretrained loads it in bfloat16 (the head too), PEFT keeps the factors in float32."""
    torch.manual_seed(2)
    LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    config = fed_config("rolora", task_type="CAUSAL_LM")
    config.modules_to_save = ["lm_head"]  # a head trained with the adapter, present in the checkpoint
    ours = published_round0(str(tmp_path / "bf16"), config, tmp_path / "store")
    today, _ = todays_round0(str(tmp_path / "bf16"), config, draw=False)
    assert_same(ours.tensors, today.tensors)
    assert ours.tensors["base_model.model.lm_head.weight"].dtype == torch.bfloat16


def test_initial_state_refuses_a_head_without_values(lm_path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = fed_config()
    with init_empty_weights():
        model = get_peft_model(AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(lm_path, num_labels=LABELS)),
                               config.to_lora_config())
    with pytest.raises(ValueError, match="draw_modules_to_save"):
        get_strategy(config).initial_state(model)


def test_llama2_7b_shaped_aggregator_starts_in_seconds(tmp_path):
    """A folder holding only config.json of a Llama-2-7B-shaped classifier (27 GB of float32 weights if
    loaded): round 0 is published in seconds, and the process grows by far less than the model."""
    folder = tmp_path / "llama-2-7b-shaped"
    LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    config = FederatedLoraConfig(strategy="fedex", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS", num_rounds=1)
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    state = published_round0(str(folder), config, tmp_path / "store")
    elapsed = time.perf_counter() - start
    grown = psutil.Process().memory_info().rss - rss
    assert elapsed < 30, elapsed
    assert grown < 1 << 30, grown  # the model is 6.7e9 parameters; the adapter and head are ~4.2e6
    assert len(state.modules()) == 64
    assert state.tensors["base_model.model.score.weight"].shape == (LABELS, 4096)
    assert state.factor("model.layers.31.self_attn.v_proj", "lora_A").shape == (8, 4096)

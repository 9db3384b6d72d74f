"""Quantized clients: a federation on a 4-bit (NF4) base through bitsandbytes on the CPU, and its refusals.

The exact strategies' base change must never be merged into quantized weights: it is a frozen
low-rank term on the LoRA layer, and the global model it gives must be what plain PEFT loads over the
same 4-bit base from the published round.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, TrainingArguments

from peft_federated import FederatedLoraConfig
from peft_federated.adapter import LowRankTerm, is_quantized, lora_layers, set_base_delta
from peft_federated.cli import main
from peft_federated.hub_integration.store import LocalStore
from peft_federated.quantization import quantization_config
from peft_federated.roles import load_base_model
from peft_federated.state import GlobalState, LowRank
from peft_federated.strategies import get_strategy
from peft_federated.trainer import run_simulation

VOCAB, SEQ = 64, 8


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A tiny random Llama checkpoint (float32): what every party loads, quantized or not. down_proj's 96
    inputs are not a multiple of 64, which bitsandbytes' CPU repacking (turned off by the loader) cannot take."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=32)
    path = tmp_path_factory.mktemp("llama") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def four_bit():
    return quantization_config(load_in_4bit=True, compute_dtype="float32")


def tokens(n: int, seed: int) -> Dataset:
    ids = np.random.default_rng(seed).integers(0, VOCAB, size=(n, SEQ)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * SEQ] * n, "labels": ids})


def fed_config(strategy: str) -> FederatedLoraConfig:
    return FederatedLoraConfig(strategy=strategy, r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
                               task_type="CAUSAL_LM", num_rounds=2, clients_per_round=2, local_steps=2)


def quantized_weights(model) -> dict[str, torch.Tensor]:
    return {name: layer.get_base_layer().weight.detach().clone() for name, layer in lora_layers(model).items()}


@pytest.mark.parametrize("strategy", ["rolora", "fedex", "flora"])
def test_4bit_federation_matches_plain_peft(strategy, llama_path, tmp_path):
    config = fed_config(strategy)
    model = get_peft_model(load_base_model(llama_path, "CAUSAL_LM", quantization=four_bit()), config.to_lora_config())
    assert all(is_quantized(layer) for layer in lora_layers(model).values())
    before = quantized_weights(model)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, learning_rate=2e-2, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    store = LocalStore(tmp_path / "store")
    result = run_simulation(model, config, {f"c{k}": tokens(8, k) for k in range(3)}, args, store, progress=False)
    assert [h["round"] for h in result.history] == [0, 1, 2]
    for name, weight in quantized_weights(model).items():  # the 4-bit weights were never written
        assert torch.equal(weight, before[name]), name

    strategy_obj = get_strategy(config)
    probe = torch.tensor(tokens(3, 99)["input_ids"])
    for rnd in (1, 2):
        state, _ = store.read_round(rnd)
        assert state.base_delta if config.strategy != "rolora" else not state.base_delta
        strategy_obj.prepare_client(model, state, "global").close()
        model.eval()
        with torch.no_grad():
            ours = model(input_ids=probe).logits
        base = load_base_model(llama_path, "CAUSAL_LM", quantization=four_bit())
        plain = PeftModel.from_pretrained(base, str(store.round_folder(rnd))).eval()
        with torch.no_grad():
            theirs = plain(input_ids=probe).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        if state.base_delta:  # the low-rank term carries the base change: without it the models differ
            terms = model.__dict__["_federated_base_terms"]
            assert set(terms) == {m for m, d in state.base_delta.items() if d.rank}
            for term in terms.values():
                term.handle.remove()
            with torch.no_grad():
                assert not torch.allclose(model(input_ids=probe).logits, theirs, rtol=1e-5, atol=1e-5)
            set_base_delta(model, {}, config.scaling)  # forget the removed terms
        if strategy == "flora":  # lora_B = 0 at a round's start: dropout must not touch the base change
            strategy_obj.prepare_client(model, state, "global").close()
            model.train()
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids=probe).logits, ours, rtol=1e-5, atol=1e-5)
        model.eval()


def test_8bit_base_change_matches_plain_peft(llama_path, tmp_path):
    """An 8-bit base takes the base change as the same low-rank term (a synthetic state with a change)."""
    config = fed_config("fedex")
    q8 = quantization_config(load_in_8bit=True)
    model = get_peft_model(load_base_model(llama_path, "CAUSAL_LM", quantization=q8), config.to_lora_config())
    g = torch.Generator().manual_seed(1)
    state = get_strategy(config).initial_state(model)
    for key, value in state.tensors.items():
        state.tensors[key] = torch.randn(value.shape, generator=g) * 0.1
    state.base_delta = {m: LowRank(torch.randn(layer.out_features, 2, generator=g) * 0.3, torch.randn(2, layer.in_features, generator=g) * 0.3)
                        for m, layer in lora_layers(model).items()}
    state = GlobalState(1, state.tensors, state.base_delta)
    store = LocalStore(tmp_path / "store")
    store.publish_round(get_strategy(config).initial_state(model), config, {})
    store.publish_round(state, config, {})
    get_strategy(config).prepare_client(model, state, "global").close()
    assert all(isinstance(t, LowRankTerm) for t in model.__dict__["_federated_base_terms"].values())
    probe = torch.tensor(tokens(2, 5)["input_ids"])
    plain = PeftModel.from_pretrained(load_base_model(llama_path, "CAUSAL_LM", quantization=q8), str(store.round_folder(1)))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=probe).logits, plain.eval()(input_ids=probe).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_effective_weight_of_a_quantized_layer_is_what_it_computes(bits, llama_path):
    """effective_weight dequantizes the base and adds its base change: each layer's output is x @ W^T (up to
    LLM.int8's quantization of the input, at 8 bits), and the base change is far above that tolerance."""
    from peft_federated.adapter import effective_weight

    config = fed_config("fedex")
    q = four_bit() if bits == 4 else quantization_config(load_in_8bit=True)
    model = get_peft_model(load_base_model(llama_path, "CAUSAL_LM", quantization=q), config.to_lora_config()).eval()
    g = torch.Generator().manual_seed(2)
    state = get_strategy(config).initial_state(model)
    tensors = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in state.tensors.items()}
    delta = {m: LowRank(torch.randn(layer.out_features, 2, generator=g) * 0.3, torch.randn(2, layer.in_features, generator=g) * 0.3)
             for m, layer in lora_layers(model).items()}
    get_strategy(config).prepare_client(model, GlobalState(1, tensors, delta), "global").close()
    tol = 1e-4 if bits == 4 else 1e-2
    for name, layer in lora_layers(model).items():
        x = torch.randn(3, layer.in_features, generator=g)
        with torch.no_grad():
            torch.testing.assert_close(layer(x).double(), x.double() @ effective_weight(model, name).T, rtol=tol, atol=tol)
        assert (x.double() @ (delta[name].U.double() @ delta[name].V.double()).T).abs().max() * config.scaling > 10 * tol


def test_float_base_still_takes_the_change_in_place(llama_path):
    """A full-precision base keeps today's path (the change copied into W0), no hook."""
    config = fed_config("fedex")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_path), config.to_lora_config())
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    w0 = layer.get_base_layer().weight.detach().clone()
    delta = LowRank(torch.ones(layer.out_features, 1), torch.ones(1, layer.in_features))
    set_base_delta(model, {"model.layers.0.self_attn.q_proj": delta}, config.scaling)
    assert not model.__dict__["_federated_base_terms"]
    torch.testing.assert_close(layer.get_base_layer().weight, w0 + config.scaling)


def test_4bit_and_8bit_together_refused():
    with pytest.raises(ValueError, match="choose one"):
        quantization_config(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="add --load-in-4bit"):
        quantization_config(load_in_8bit=True, double_quant=True)


def test_cli_refuses_both_before_anything(tmp_path, capsys):
    store = tmp_path / "store"
    code = main(["client", "--local-dir", str(store), "--client-id", "a", "--data", str(tmp_path / "data.json"),
                 "--load-in-4bit", "--load-in-8bit"])
    assert code == 2
    assert "choose one, --load-in-4bit" in capsys.readouterr().err
    assert not store.exists()


def test_cli_refuses_4bit_without_bitsandbytes(tmp_path, monkeypatch, capsys):
    """bitsandbytes blocked from importing (as where it is not installed): a clear refusal naming the fix."""
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    store = tmp_path / "store"
    code = main(["client", "--local-dir", str(store), "--client-id", "a", "--data", "x.json", "--load-in-4bit"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--load-in-4bit needs bitsandbytes, which cannot be imported here" in err
    assert "pip install 'peft-federated[quantization]'" in err
    assert not store.exists()


def test_reading_the_adapter_leaves_4bit_weights_alone(tmp_path):
    """bitsandbytes repacks a 4-bit weight for CPU inference and converts it back in `state_dict()`, losing
    its scales' layout (rows of several 64-value blocks): reading the adapter must not run state-dict hooks."""
    from peft_federated.adapter import read_tensors

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=32)).save_pretrained(tmp_path / "llama128")
    config = fed_config("fedex")
    model = get_peft_model(load_base_model(str(tmp_path / "llama128"), "CAUSAL_LM", quantization=four_bit()), config.to_lora_config()).eval()
    from bitsandbytes.functional import has_avx512bf16

    for module in model.modules():  # bitsandbytes' own default (where the CPU has AVX512-BF16: repacked)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = has_avx512bf16()
    probe = torch.tensor(tokens(2, 3)["input_ids"])
    with torch.no_grad():
        first = model(input_ids=probe).logits
        tensors = read_tensors(model)
        again = model(input_ids=probe).logits
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    expected = get_peft_model_state_dict(model)  # through state_dict(), last: it converts the weights
    assert set(tensors) == set(expected) and all(torch.equal(tensors[k], expected[k]) for k in expected)


def test_run_client_on_a_4bit_base(tmp_path):
    """The client role with `quantization=` (what --load-in-4bit passes): a FLoRA SEQ_CLS federation whose
    aggregator (config only) and 4-bit client share a LocalStore; every round loads with plain PEFT."""
    import json
    import threading

    from transformers import LlamaForSequenceClassification

    from peft_federated.aggregator import aggregate_round
    from peft_federated.roles import run_client, start_aggregator

    torch.manual_seed(0)
    path = tmp_path / "llama-cls"
    LlamaForSequenceClassification(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, num_labels=2, pad_token_id=0)).save_pretrained(path)
    rows = [{"input_ids": ids, "attention_mask": [1] * SEQ, "label": ids[0] % 2} for ids in tokens(16, 4)["input_ids"]]
    data = tmp_path / "train.json"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    config = FederatedLoraConfig(strategy="flora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS",
                                 num_rounds=2, local_steps=2, base_model_name_or_path=str(path))
    store = LocalStore(tmp_path / "store")
    start_aggregator(store, config, str(path))
    errors = []

    def client():
        try:
            run_client(LocalStore(tmp_path / "store"), "alice", data, output_dir=str(tmp_path / "out"), batch_size=8,
                       learning_rate=1e-2, poll_interval=0.1, round_timeout=120, quantization=four_bit())
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while (store.latest_round() or 0) < config.num_rounds and time.monotonic() < deadline and not errors:
        if store.list_updates(store.latest_round()):
            aggregate_round(store, config, ["alice"])
        time.sleep(0.1)
    thread.join(timeout=60)
    assert not errors, errors
    assert store.latest_round() == config.num_rounds
    probe = torch.tensor(tokens(2, 8)["input_ids"])
    for rnd in (1, 2):
        state, meta = store.read_round(rnd)
        assert [c["client_id"] for c in meta["contributions"]] == ["alice"] and state.base_delta
        plain = PeftModel.from_pretrained(load_base_model(str(path), "SEQ_CLS", quantization=four_bit()), str(store.round_folder(rnd)))
        with torch.no_grad():
            assert torch.isfinite(plain.eval()(input_ids=probe).logits).all()


def test_bitsandbytes_that_cannot_run_is_refused(monkeypatch):
    """A bitsandbytes build whose 4-bit kernels fail on this machine, or one too old for the CPU: refused, naming the fix."""
    import bitsandbytes

    from peft_federated.quantization import QuantizationUnavailableError

    def broken(self, x):
        raise RuntimeError("no kernel for this device")

    with monkeypatch.context() as m:
        m.setattr(bitsandbytes.nn.Linear4bit, "forward", broken)
        with pytest.raises(QuantizationUnavailableError, match="cannot run a 4-bit layer on .*no kernel.*drop --load-in-4bit"):
            quantization_config(load_in_4bit=True)
    with monkeypatch.context() as m:
        m.setattr(bitsandbytes, "__version__", "0.42.0")
        with pytest.raises(QuantizationUnavailableError, match=r"bitsandbytes>=0\.45 \(found 0\.42\.0"):
            quantization_config(load_in_8bit=True)
    assert quantization_config(load_in_4bit=True, double_quant=True).bnb_4bit_use_double_quant

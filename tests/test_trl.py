"""FederatedSFTTrainer: TRL's SFTTrainer runs a federated client's rounds on a tiny causal LM."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from peft_federated import FederatedLoraConfig
from peft_federated.adapter import read_tensors
from peft_federated.demo import minilm_path
from peft_federated.trainer.trl import FederatedSFTTrainer
from trl import SFTConfig


def test_sft_trainer_runs_federated_rounds(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())  # offline WordPiece tokenizer
    tokenizer.eos_token = tokenizer.sep_token
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    # GPT-2's c_attn is a Conv1D 16 -> 48: non-square, stored transposed (fan_in_fan_out)
    cfg = FederatedLoraConfig(strategy="fedex", r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True,
                              task_type="CAUSAL_LM", num_rounds=2, local_steps=3)
    model = get_peft_model(lm, cfg.to_lora_config())
    data = Dataset.from_dict({"text": [f"the federated client number {i} says hello" for i in range(24)]})
    args = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_length=32, learning_rate=1e-2,
                     report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    trainer = FederatedSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                                  federated_config=cfg, client_id="lab-a")
    state = trainer.strategy.initial_state(model)
    for round in range(2):
        before = read_tensors(model)
        payload, num_samples, metrics = trainer.train_round(state)
        assert num_samples == 24 and metrics["train_loss"] > 0
        assert set(payload) == {k for k in before if "lora_" in k}
        changed = [k for k in payload if not torch.equal(payload[k], state.tensors[k])]
        assert changed, "SFT training did not move the adapter"
        state = trainer.strategy.aggregate(state, [("lab-a", payload, num_samples)])
        assert state.round == round + 1


PREFERENCES = {"prompt": [f"what does client {i} say" for i in range(8)],
               "chosen": [f" client {i} says hello" for i in range(8)],
               "rejected": [f" client {i} stays silent" for i in range(8)]}


def test_dpo_trainer_runs_federated_rounds_against_the_federations_base(tmp_path):
    """FederatedDPOTrainer (TRL's DPOTrainer through FederatedMixin) moves the adapter each round, and
    its reference stays the base model the federation started from, even after FedEx-LoRA changed
    the frozen base weights: reference log-probs computed after round 1 equal those of round 0."""
    from test_sft_data import lm_config, save_tiny_llama
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from peft_federated.adapter import lora_layers
    from peft_federated.trainer.trl import FederatedDPOTrainer

    folder = save_tiny_llama(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    cfg = lm_config(strategy="fedex")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder), cfg.to_lora_config())
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, max_length=32, learning_rate=5e-2,
                     report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=False,
                     gradient_checkpointing=False, use_cpu=True, seed=0)
    trainer = FederatedDPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(PREFERENCES),
                                  processing_class=tokenizer, federated_config=cfg, client_id="lab-a")
    assert list(model.peft_config) == ["default"]  # no second ("ref") adapter rides along in the updates
    ref_round_0 = trainer.train_dataset["ref_chosen_logps"]
    state = trainer.strategy.initial_state(model)
    for round in range(2):
        updates = []
        for client in ("lab-a", "lab-b"):  # two clients: FedEx's residual (the base change) is non-zero
            trainer.client_id = client
            payload, num_samples, metrics = trainer.train_round(state)
            assert set(payload) == {k for k in read_tensors(model) if "lora_" in k}
            assert any(not torch.equal(payload[k], state.tensors[k]) for k in payload), "DPO did not move the adapter"
            assert metrics["train_loss"] > 0
            updates.append((client, payload, num_samples))
        state = trainer.strategy.aggregate(state, updates)
        assert any(float(d.dense().abs().max()) > 0 for d in state.base_delta.values())
    trainer.strategy.prepare_client(model, state, "lab-a").close()  # the live base is now W0 + the federation's change
    layer = next(iter(lora_layers(model).values()))
    assert not torch.equal(layer.get_base_layer().weight, model._federated_base_w0[next(iter(lora_layers(model)))])
    reversed_rows = Dataset.from_dict({k: v[::-1] for k, v in PREFERENCES.items()})
    later = trainer._precompute_ref_logps(trainer._prepare_dataset(reversed_rows, tokenizer, args, "eval"), "eval", 4)
    torch.testing.assert_close(torch.tensor(later["ref_chosen_logps"]), torch.tensor(ref_round_0[::-1]))

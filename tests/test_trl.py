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

"""A language-model client's data: each format TRL's SFTTrainer accepts trains federated rounds on a
tiny random Llama, with the labels of the batches the trainer really collates checked; and every
kind of data that cannot train is refused, with what to change, before any round trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig

from peft_federated import FederatedLoraConfig
from peft_federated.data.sft import SFTDataError, detect_format, prepare_sft_data, read_dataset
from peft_federated.demo import minilm_path
from peft_federated.trainer.trl import FederatedSFTTrainer

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
TARGETS = ["q_proj", "v_proj", "down_proj"]  # down_proj is 32 -> 64: non-square


def save_tiny_llama(folder: Path, chat_template: bool = True, seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM (hidden 32, one layer) with MiniLM's WordPiece tokenizer beside it."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = tokenizer.sep_token
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.sep_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_config(**kw) -> FederatedLoraConfig:
    kw = {"strategy": "fedex", "num_rounds": 2, "local_steps": 2, **kw}
    return FederatedLoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, task_type="CAUSAL_LM", **kw)


def sft_args(tmp_path: Path, **kw) -> SFTConfig:
    base = dict(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=4, max_length=64, learning_rate=1e-2,
                report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, bf16=False,
                gradient_checkpointing=False, use_cpu=True, seed=0)
    return SFTConfig(**{**base, **kw})


ROWS = {
    "text": {"text": [f"the client number {i} says hello" for i in range(8)]},
    "prompt_completion": {"prompt": [f"what does client {i} say" for i in range(8)],
                          "completion": [f" client {i} says hello" for i in range(8)]},
    "messages": {"messages": [[{"role": "user", "content": f"what does client {i} say"},
                               {"role": "assistant", "content": f"client {i} says hello"}] for i in range(8)]},
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tokenizer(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def trainer_for(llama_dir, tokenizer, data, tmp_path, config=None, **args):
    config = config or lm_config()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(llama_dir), config.to_lora_config())
    return FederatedSFTTrainer(model=model, args=sft_args(tmp_path, **args), train_dataset=data, processing_class=tokenizer,
                               federated_config=config, client_id="lab-a")


@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_trains_rounds_with_the_right_labels(fmt, llama_dir, tokenizer, tmp_path):
    data, detected = prepare_sft_data(Dataset.from_dict(ROWS[fmt]), tokenizer)
    assert detected.kind == fmt
    trainer = trainer_for(llama_dir, tokenizer, data, tmp_path)
    batch = next(iter(trainer.get_train_dataloader()))  # the batch the training loop really sees
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (labels[mask == 0] == -100).all()  # padding never carries a label
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        kept = labels[row][real] != -100
        assert torch.equal(labels[row][real][kept], ids[row][real][kept])  # labels are the tokens themselves
        text = tokenizer.decode(ids[row][real][kept])
        if fmt == "prompt_completion":  # the loss on the completion only: every prompt token is -100
            assert "says hello" in text and "what does" not in text
            assert not kept[0] and kept[-1]
        else:  # text and messages: the loss on the whole sequence
            assert kept.all()
        if fmt == "messages":  # rendered with the tokenizer's chat template
            assert tokenizer.decode(ids[row][real]).startswith("user : what does client")
    state = trainer.strategy.initial_state(trainer.model)
    for round in range(2):
        payload, num_samples, metrics = trainer.train_round(state)
        assert num_samples == 8 and metrics["train_loss"] > 0
        assert any(not torch.equal(payload[k], state.tensors[k]) for k in payload), "SFT training did not move the adapter"
        state = trainer.strategy.aggregate(state, [("lab-a", payload, num_samples)])
        assert state.round == round + 1


def test_tokenized_data_keeps_its_labels_and_gradient_checkpointing_trains(llama_dir, tokenizer, tmp_path):
    ids = [tokenizer(t)["input_ids"] for t in ROWS["text"]["text"]]
    labels = [[-100] * 3 + row[3:] for row in ids]  # the caller's own mask: no loss on the first three tokens
    data, fmt = prepare_sft_data(Dataset.from_dict({"input_ids": ids, "labels": labels, "attention_mask": [[1] * len(r) for r in ids]}))
    assert fmt.kind == "tokenized" and data.column_names == ["input_ids", "labels"]
    trainer = trainer_for(llama_dir, tokenizer, data, tmp_path, gradient_checkpointing=True)
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"][:, :3] == -100).all() and (batch["labels"][:, 3] != -100).all()
    state = trainer.strategy.initial_state(trainer.model)
    payload, _, metrics = trainer.train_round(state)
    assert metrics["train_loss"] > 0 and any(not torch.equal(payload[k], state.tensors[k]) for k in payload)


def test_prompts_filling_max_length_are_dropped_and_refused_when_none_is_left(llama_dir, tokenizer, tmp_path, caplog):
    rows = {"prompt": ["short", "a much longer prompt than the first one is"], "completion": [" yes", " no"]}
    data, _ = prepare_sft_data(Dataset.from_dict(rows), tokenizer)
    trainer = trainer_for(llama_dir, tokenizer, data, tmp_path, max_length=5)
    assert len(trainer.train_dataset) == 1  # the long prompt fills max_length: dropped, with a warning
    assert "1 of 2 train examples dropped" in caplog.text
    with pytest.raises(SFTDataError, match=r"every prompt fills it .*Raise --max-length"):
        trainer_for(llama_dir, tokenizer, data, tmp_path, max_length=2)  # "[CLS] short" is 2 tokens
    # plain text longer than max_length is truncated, as TRL does, and still trains
    text, _ = prepare_sft_data(Dataset.from_dict(ROWS["text"]), tokenizer)
    trainer = trainer_for(llama_dir, tokenizer, text, tmp_path, max_length=4)
    assert len(trainer.train_dataset) == 8 and max(len(r) for r in trainer.train_dataset["input_ids"]) == 4
    with pytest.raises(SFTDataError, match="max-length 2 or more"):
        trainer_for(llama_dir, tokenizer, text, tmp_path, max_length=1)


def test_packing_trains_and_still_refuses_untrainable_data(llama_dir, tokenizer, tmp_path):
    data, _ = prepare_sft_data(Dataset.from_dict(ROWS["text"]), tokenizer)
    trainer = trainer_for(llama_dir, tokenizer, data, tmp_path, packing=True, max_length=32)
    assert len(trainer.train_dataset) < 8 and max(len(r) for r in trainer.train_dataset["input_ids"]) <= 32
    payload, _, metrics = trainer.train_round(trainer.strategy.initial_state(trainer.model))
    assert metrics["train_loss"] > 0
    pc, _ = prepare_sft_data(Dataset.from_dict(ROWS["prompt_completion"]), tokenizer)
    with pytest.raises(SFTDataError, match="every prompt fills it"):
        trainer_for(llama_dir, tokenizer, pc, tmp_path, packing=True, max_length=3)


def test_formats_are_detected_from_columns_or_named():
    assert detect_format(["messages", "text"]).kind == "messages"
    assert detect_format(["conversations"]).columns == {"messages": "conversations"}
    assert detect_format(["prompt", "completion", "text"]).kind == "prompt_completion"
    assert detect_format(["text", "label"]).columns == {"text": "text"}
    assert detect_format(["input_ids", "labels", "attention_mask"]).columns == {"input_ids": "input_ids", "labels": "labels"}
    assert detect_format(["q", "a"], prompt_column="q", completion_column="a").columns == {"prompt": "q", "completion": "a"}
    assert detect_format(["body", "text"], text_column="body").columns == {"text": "body"}
    assert detect_format(["chat"], messages_column="chat").columns == {"messages": "chat"}


@pytest.mark.parametrize("columns, kw, message", [
    (["body", "label"], {}, r"none of the columns .*'text' .*--text-column"),
    (["prompt", "label"], {}, r"'prompt' column but no 'completion' column.*--completion-column"),
    (["text"], {"text_column": "body"}, r"no column 'body' \(--text-column\)"),
    (["q", "a"], {"prompt_column": "q"}, r"no column 'completion' for prompt/completion"),
    (["text", "chat"], {"text_column": "text", "messages_column": "chat"}, "name one format"),
])
def test_data_without_the_columns_of_a_format_is_refused(columns, kw, message):
    with pytest.raises(SFTDataError, match=message):
        detect_format(columns, source="train.jsonl", **kw)


def test_bad_rows_and_missing_chat_template_are_refused(tokenizer):
    with pytest.raises(SFTDataError, match="has no rows"):
        prepare_sft_data(Dataset.from_dict({"text": []}), tokenizer)
    with pytest.raises(SFTDataError, match="row 1 has no 'text'"):
        prepare_sft_data(Dataset.from_dict({"text": ["fine", "  "]}), tokenizer)
    with pytest.raises(SFTDataError, match="row 0 of 'messages' is not a list of"):
        prepare_sft_data(Dataset.from_dict({"messages": [[{"speaker": "x"}]]}), tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(SFTDataError, match="no chat template.*--chat-template"):
        prepare_sft_data(Dataset.from_dict(ROWS["messages"]), tokenizer)


def test_files_in_every_format_are_read(tmp_path, tokenizer):
    (tmp_path / "chat.csv").write_text("messages\n" + "".join(
        '"' + json.dumps(m).replace('"', '""') + '"\n' for m in ROWS["messages"]["messages"]))
    data, fmt = prepare_sft_data(read_dataset(tmp_path / "chat.csv"), tokenizer)
    assert fmt.kind == "messages" and data[0]["messages"] == ROWS["messages"]["messages"][0]
    (tmp_path / "pc.jsonl").write_text("".join(json.dumps({"q": p, "a": c, "id": i}) + "\n" for i, (p, c) in
                                               enumerate(zip(*ROWS["prompt_completion"].values()))))
    data, fmt = prepare_sft_data(read_dataset(tmp_path / "pc.jsonl"), tokenizer, prompt_column="q", completion_column="a")
    assert data.column_names == ["prompt", "completion"] and data[3]["completion"] == " client 3 says hello"
    Dataset.from_dict(ROWS["text"]).save_to_disk(str(tmp_path / "saved"))
    assert prepare_sft_data(read_dataset(tmp_path / "saved"), tokenizer)[1].kind == "text"
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SFTDataError, match="has no rows"):
        prepare_sft_data(read_dataset(tmp_path / "empty.jsonl"), tokenizer, source="empty.jsonl")

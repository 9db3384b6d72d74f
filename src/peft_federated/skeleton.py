"""The aggregator's model: the base model's modules and shapes on the meta device, no base weight.

The aggregator never computes with the base model. Round 0 needs only the shapes of the LoRA factors
(lora_A is drawn from `init_seed`, lora_B is zero), which the model's config gives: `skeleton_model`
builds the PeftModel under `accelerate.init_empty_weights`, from config.json alone, in about a second
whatever the model's size. Only tensors trained with the adapter (`modules_to_save`, e.g. the
classification head PEFT adds for SEQ_CLS) need values. A tensor the checkpoint holds is read alone
from its safetensors file; one it lacks (a new head) is drawn by the model's own initialisation from a
generator seeded by `init_seed` and the module's name (`draw_modules_to_save`), which any party can
repeat. Clients start from round 0's values anyway.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import PeftModel

    from peft_federated.config import FederatedLoraConfig

logger = logging.getLogger(__name__)
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
BIN_INDEX, BIN = "pytorch_model.bin.index.json", "pytorch_model.bin"


def skeleton_model(path: str, config: "FederatedLoraConfig", num_labels: Optional[int] = None) -> "PeftModel":
    """The federation's PeftModel for `path` (a model folder or Hub id) with every base weight and LoRA
    factor on the meta device, built from its config.json; `modules_to_save` tensors get real values
    (see the module docstring). The dtype is the config's, as `from_pretrained` would load it."""
    import transformers
    from accelerate import init_empty_weights
    from peft import get_peft_model

    from peft_federated.roles import auto_model_class

    cls = auto_model_class(config.task_type)
    model_config = transformers.AutoConfig.from_pretrained(path, **({"num_labels": num_labels} if num_labels else {}))
    dtype = getattr(model_config, "dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else torch.float32
    with init_empty_weights():
        model = get_peft_model(cls.from_config(model_config, dtype=dtype), config.to_lora_config())
    fill_modules_to_save(model, path, config.init_seed)
    return model


def modules_to_save(model: "PeftModel") -> dict[str, nn.Module]:
    """The trainable copy of every `modules_to_save` module, by its name in the base model."""
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    return {name: wrapper.modules_to_save[wrapper.active_adapter] for name, wrapper in base.named_modules()
            if isinstance(wrapper, ModulesToSaveWrapper) and wrapper.active_adapter in wrapper.modules_to_save}


def draw_modules_to_save(model: "PeftModel", seed: int, names: Optional[list[str]] = None) -> None:
    """(Re)draw the trainable copies of `modules_to_save` modules (all, or `names`) on the CPU with the
    model's own weight initialisation, from a generator seeded by `seed` and the module's name: every
    party that calls this with the federation's `init_seed` gets the same values bit for bit."""
    base = model.get_base_model()
    for name, module in modules_to_save(model).items():
        if names is not None and name not in names:
            continue
        if any(p.is_meta for p in module.parameters()):
            module.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(zlib.crc32(f"{seed}/{name}".encode()))
            for sub in module.modules():
                for p in sub.parameters(recurse=False):
                    p._is_hf_initialized = False  # transformers' init skips tensors it marked as loaded
                if hasattr(base, "_init_weights"):
                    base._init_weights(sub)
                elif hasattr(sub, "reset_parameters"):
                    sub.reset_parameters()


def fill_modules_to_save(model: "PeftModel", path: str, seed: int) -> None:
    """Give every meta `modules_to_save` copy real values: the checkpoint's where it holds the module's
    tensors (read alone), else drawn from `seed` (`draw_modules_to_save`)."""
    targets = {name: module for name, module in modules_to_save(model).items() if any(p.is_meta for p in module.parameters())}
    if not targets:
        return
    weight_map = checkpoint_weight_map(path)
    prefix = getattr(model.get_base_model(), "base_model_prefix", "")
    drawn = []
    for name, module in targets.items():
        params = dict(module.named_parameters())
        found = {key: _checkpoint_key(f"{name}.{key}", weight_map, prefix) for key in params}
        if not any(found.values()):
            drawn.append(name)
            continue
        missing = [key for key, where in found.items() if where is None]
        if missing:
            raise ValueError(f"The checkpoint at {path} holds part of {name} ({missing} missing): the aggregator needs all "
                             f"of a trained module's tensors, or none (then they are drawn from init_seed={seed}).")
        module.to_empty(device="cpu")
        params = dict(module.named_parameters())  # new tensors: to_empty replaces them
        with torch.no_grad():
            for key, (file, ckpt_key) in found.items():
                value = _read_tensor(path, file, ckpt_key)
                if tuple(value.shape) != tuple(params[key].shape):
                    raise ValueError(f"{path}: {ckpt_key} has shape {tuple(value.shape)} but the model's {name}.{key} has "
                                     f"{tuple(params[key].shape)}; check --num-labels against the checkpoint's head.")
                params[key].copy_(value.to(params[key].dtype))
        logger.info("%s: read from the checkpoint at %s", name, path)
    if drawn:
        draw_modules_to_save(model, seed, drawn)
        logger.info("%s: not in the checkpoint at %s, drawn from init_seed=%d", ", ".join(drawn), path, seed)


def _checkpoint_key(name: str, weight_map: dict[str, str], prefix: str) -> Optional[tuple[str, str]]:
    """(file, key) of a base-model parameter in the checkpoint, with or without the base-model prefix."""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(f"{prefix}."), f"{prefix}.{name}"]
    return next(((weight_map[c], c) for c in candidates if c in weight_map), None)


def checkpoint_weight_map(path: str) -> dict[str, str]:
    """Every tensor name of the checkpoint at `path` (a folder or Hub id) -> the safetensors file holding
    it, from the index or the file's header (a .bin file is memory-mapped): no tensor is read. Empty
    when it has no weights (then every `modules_to_save` tensor is drawn from the seed)."""
    folder = Path(path)
    if folder.is_dir():
        if (folder / SAFETENSORS_INDEX).is_file():
            return json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
        if (folder / SAFETENSORS).is_file():
            from safetensors import safe_open

            with safe_open(str(folder / SAFETENSORS), "pt") as f:
                return {key: SAFETENSORS for key in f.keys()}
        if (folder / BIN_INDEX).is_file():
            return json.loads((folder / BIN_INDEX).read_text())["weight_map"]
        if (folder / BIN).is_file():
            return {key: BIN for key in _load_bin(folder / BIN)}
        return {}
    from huggingface_hub import get_safetensors_metadata
    from huggingface_hub.errors import NotASafetensorsRepoError

    try:
        return dict(get_safetensors_metadata(path).weight_map)
    except NotASafetensorsRepoError:
        return {}


def _read_tensor(path: str, file: str, key: str) -> torch.Tensor:
    from safetensors import safe_open

    local = Path(path) / file
    if not local.is_file():
        from huggingface_hub import hf_hub_download

        local = Path(hf_hub_download(path, file))
    if file.endswith(".bin"):
        return _load_bin(local)[key].clone()
    with safe_open(str(local), "pt") as f:
        return f.get_tensor(key)


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint memory-mapped: its tensors are read only where touched."""
    return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)


__all__ = ["checkpoint_weight_map", "draw_modules_to_save", "fill_modules_to_save", "modules_to_save", "skeleton_model"]

"""Reading and writing a live `PeftModel`: its LoRA factors, extra trainable tensors and frozen base."""

from __future__ import annotations

import math
import zlib

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import transpose
from torch import Tensor

from peft_federated.state import PEFT_PREFIX, LowRank, parse_lora_key

def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The model's LoRA layers by module name (the name used in adapter keys)."""
    return {
        name.removeprefix(PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and module.active_adapters[0] in module.lora_A
    }


def _adapter(layer: LoraLayer) -> str:
    return layer.active_adapters[0]


def model_rank(model: PeftModel) -> int:
    """The LoRA rank every module of the model has (federated strategies need one)."""
    ranks = {layer.r[_adapter(layer)] for layer in lora_layers(model).values()}
    if len(ranks) != 1:
        raise ValueError(f"The model's LoRA modules have different ranks {sorted(ranks)}; federation needs one rank.")
    return ranks.pop()


def model_scale(model: PeftModel) -> float:
    """The LoRA scale shared by every module of the model."""
    scales = {layer.scaling[_adapter(layer)] for layer in lora_layers(model).values()}
    if len(scales) != 1:
        raise ValueError(f"The model's LoRA modules have different scales {sorted(scales)}; federation needs one.")
    return scales.pop()


def read_tensors(model: PeftModel) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's keys, detached copies on the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in get_peft_model_state_dict(model).items()}


def write_tensors(model: PeftModel, tensors: dict[str, Tensor]) -> None:
    """Load adapter tensors into the model; LoRA factors of a lower rank fill the leading ranks, zeros the rest."""
    layers = lora_layers(model)
    full = {}
    for key, value in tensors.items():
        parsed = parse_lora_key(key)
        if parsed is None:
            full[key] = value
            continue
        module, factor = parsed
        if module not in layers:
            raise ValueError(f"The model has no LoRA module {module!r} (its modules: {', '.join(layers)}).")
        target = getattr(layers[module], factor)[_adapter(layers[module])].weight
        padded = torch.zeros_like(target)
        if factor == "lora_A":
            padded[: value.shape[0]] = value
        else:
            padded[:, : value.shape[1]] = value
        full[key] = padded
    result = set_peft_model_state_dict(model, full)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"Adapter tensors the model does not have: {unexpected[:5]}")


def set_base_delta(model: PeftModel, base_delta: dict[str, LowRank], scale: float) -> None:
    """Make each LoRA module's frozen base W0 + scale * U @ V, from a snapshot of the original W0.

    The snapshot (CPU) is taken the first time a module's base changes and kept on the model, so a
    new round's delta replaces the last one instead of adding to it.
    """
    layers = lora_layers(model)
    originals: dict[str, Tensor] = model.__dict__.setdefault("_federated_base_w0", {})
    for module in sorted(set(base_delta) | set(originals)):
        layer = layers[module]
        weight = layer.get_base_layer().weight
        if module not in originals:
            originals[module] = weight.detach().to("cpu", copy=True)
        w0 = originals[module]
        delta = base_delta.get(module)
        with torch.no_grad():
            if delta is None or delta.rank == 0:
                weight.copy_(w0.to(weight.device))
            else:
                change = scale * (delta.U.double() @ delta.V.double())
                change = transpose(change, layer.fan_in_fan_out)
                weight.copy_((w0.double() + change).to(weight.dtype).to(weight.device))


def effective_weight(model: PeftModel, module: str) -> Tensor:
    """W_base + scale * B @ A of one module, as d_out x d_in in float64 (for checks and tests)."""
    layer = lora_layers(model)[module]
    name = _adapter(layer)
    base = transpose(layer.get_base_layer().weight.detach().double(), layer.fan_in_fan_out)
    A, B = layer.lora_A[name].weight.detach().double(), layer.lora_B[name].weight.detach().double()
    return base.cpu() + layer.scaling[name] * (B @ A).cpu()


def set_factor_trainable(model: PeftModel, trainable: tuple[str, ...]) -> None:
    """Freeze or unfreeze lora_A / lora_B of every module (other trainable tensors are left as they are),
    dropping gradients left over from an earlier round."""
    for layer in lora_layers(model).values():
        name = _adapter(layer)
        for factor, module in (("lora_A", layer.lora_A[name]), ("lora_B", layer.lora_B[name])):
            module.weight.grad = None
            module.weight.requires_grad_(factor in trainable)


def mask_rank(model: PeftModel, rank: int) -> list:
    """Keep the ranks beyond `rank` at zero while training: zero their gradients. Returns hook handles."""
    handles = []
    for layer in lora_layers(model).values():
        name = _adapter(layer)
        if layer.r[name] <= rank:
            continue
        A, B = layer.lora_A[name].weight, layer.lora_B[name].weight

        def mask_rows(grad: Tensor) -> Tensor:
            grad = grad.clone()
            grad[rank:] = 0
            return grad

        def mask_cols(grad: Tensor) -> Tensor:
            grad = grad.clone()
            grad[:, rank:] = 0
            return grad

        handles += [A.register_hook(mask_rows), B.register_hook(mask_cols)]
    return handles


def init_lora_A(shape: tuple[int, int], seed: int, *salt: object, dtype: torch.dtype = torch.float32) -> Tensor:
    """PEFT's default lora_A initialisation (kaiming-uniform, a=sqrt(5): U(-1/sqrt(d_in), 1/sqrt(d_in))),
    drawn from a generator seeded by `seed` and `salt` so that every party derives the same tensor."""
    text = "/".join(str(s) for s in (seed, *salt))
    generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


__all__ = [
    "effective_weight",
    "init_lora_A",
    "lora_layers",
    "mask_rank",
    "model_rank",
    "model_scale",
    "read_tensors",
    "set_base_delta",
    "set_factor_trainable",
    "write_tensors",
]

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
    """The adapter's tensors under PEFT's keys, detached copies on the CPU (left on the meta device where
    the model has no values: an aggregator's skeleton, see `peft_federated.skeleton`)."""
    tensors = get_peft_model_state_dict(model, state_dict=_own_tensors(model))
    return {k: v.detach() if v.is_meta else v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def _own_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """What `model.state_dict()` holds (parameters, persistent buffers) without running the modules'
    state-dict hooks: no quantized layer serialises (or, in bitsandbytes, converts) its weight."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                out[dot + name] = param
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                out[dot + name] = buffer
    return out


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
    """Make each LoRA module's frozen base W0 + scale * U @ V.

    A float base weight is rewritten from a snapshot of the original W0 (CPU, taken the first time a
    module's base changes and kept on the model), so a new round's delta replaces the last one instead
    of adding to it. A quantized base (bitsandbytes 4-bit / 8-bit: a non-float weight) is never
    touched: the change is a `LowRankTerm` on the LoRA layer, replaced each round.
    """
    layers = lora_layers(model)
    originals: dict[str, Tensor] = model.__dict__.setdefault("_federated_base_w0", {})
    terms: dict[str, LowRankTerm] = model.__dict__.setdefault("_federated_base_terms", {})
    for module in sorted(set(base_delta) | set(originals) | set(terms)):
        layer = layers[module]
        delta = base_delta.get(module)
        if delta is not None and delta.rank == 0:
            delta = None
        if is_quantized(layer):
            if module in terms:
                terms.pop(module).remove()
            if delta is not None:
                terms[module] = LowRankTerm(layer, delta, scale)
            continue
        weight = layer.get_base_layer().weight
        if module not in originals:
            originals[module] = weight.detach().to("cpu", copy=True)
        w0 = originals[module]
        with torch.no_grad():
            if delta is None:
                weight.copy_(w0.to(weight.device))
            else:
                change = scale * (delta.U.double() @ delta.V.double())
                change = transpose(change, layer.fan_in_fan_out)
                weight.copy_((w0.double() + change).to(weight.dtype).to(weight.device))


def is_quantized(layer: LoraLayer) -> bool:
    """Whether the layer's frozen base weight is quantized (not a float tensor: bitsandbytes' 4-bit
    Params4bit holds uint8, its 8-bit Int8Params int8), so it cannot take a base change in place."""
    return not layer.get_base_layer().weight.is_floating_point()


class LowRankTerm:
    """A frozen base change scale * U @ V added to a LoRA layer's output as a forward hook: y += scale *
    (x @ V^T) @ U^T, computed as PEFT computes the LoRA term (input cast to the LoRA factors' dtype, the
    result cast back to the output's), without dropout. Exactly what plain PEFT computes from the
    published adapter, where U, V are the ranks after r. Part of the base: it stays when the trained
    adapter is disabled or merged, as a float base's change does."""

    def __init__(self, layer: LoraLayer, delta: LowRank, scale: float) -> None:
        factor = layer.lora_A[_adapter(layer)].weight
        self.U = delta.U.detach().to(factor.device, factor.dtype)
        self.V = delta.V.detach().to(factor.device, factor.dtype)
        self.scale = scale
        self.handle = layer.register_forward_hook(self, with_kwargs=True)

    def __call__(self, layer: LoraLayer, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
        x = args[0] if args else kwargs["x"]
        term = (x.to(self.V.dtype) @ self.V.T) @ self.U.T * self.scale
        return output + term.to(output.dtype)

    def remove(self) -> None:
        self.handle.remove()


def effective_weight(model: PeftModel, module: str) -> Tensor:
    """W_base + scale * B @ A of one module, as d_out x d_in in float64 (for checks and tests). A
    quantized base (bitsandbytes 4- or 8-bit) is dequantized as PEFT dequantizes it, with its base
    change (a `LowRankTerm`) added."""
    from peft.utils.integrations import dequantize_module_weight

    layer = lora_layers(model)[module]
    name = _adapter(layer)
    base = transpose(dequantize_module_weight(layer.get_base_layer()).detach().double(), layer.fan_in_fan_out).cpu()
    if (term := model.__dict__.get("_federated_base_terms", {}).get(module)) is not None:
        base = base + term.scale * (term.U.double() @ term.V.double()).cpu()
    A, B = layer.lora_A[name].weight.detach().double(), layer.lora_B[name].weight.detach().double()
    return base + layer.scaling[name] * (B @ A).cpu()


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
    "is_quantized",
    "LowRankTerm",
    "lora_layers",
    "mask_rank",
    "model_rank",
    "model_scale",
    "read_tensors",
    "set_base_delta",
    "set_factor_trainable",
    "write_tensors",
]

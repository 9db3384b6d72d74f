"""Quantized clients: the frozen base loaded in 4-bit (NF4) or 8-bit through bitsandbytes, LoRA on top.

Only clients load weights (the aggregator needs none, see `peft_federated.skeleton`), so only they
quantize, each as its hardware allows: the published adapters are the same. The LoRA factors stay in
float. An exact strategy's base change (FedEx-LoRA's residual, FLoRA's merge) is never merged into a
quantized weight: it is added as a frozen low-rank term on the LoRA layer (`adapter.LowRankTerm`),
which is what plain PEFT computes from the published round's extra ranks.

    quantization = quantization_config(load_in_4bit=True, double_quant=True)  # checked before anything loads
    model = load_quantized(AutoModelForCausalLM, path, quantization)          # prepare_model_for_kbit_training
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

MIN_BITSANDBYTES = "0.45"
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANT_TYPES = ("nf4", "fp4")


class QuantizationUnavailableError(RuntimeError):
    """bitsandbytes is missing, too old, or cannot run on this machine."""


def quantization_config(load_in_4bit: bool = False, load_in_8bit: bool = False, quant_type: str = "nf4",
                        double_quant: bool = False, compute_dtype: Optional[str | torch.dtype] = None) -> Optional["BitsAndBytesConfig"]:
    """The `BitsAndBytesConfig` of a quantized client (None for a full-precision one), after checking that
    the options agree and that bitsandbytes runs here: every refusal is raised before any model loads.

    `compute_dtype` (4-bit): the dtype the dequantized layers compute in; default bfloat16 on a GPU that
    supports it, float32 otherwise (the CPU)."""
    if load_in_4bit and load_in_8bit:
        raise ValueError("Asked for 4-bit and 8-bit quantization at once: choose one, --load-in-4bit (NF4, a quarter "
                         "of bfloat16's memory) or --load-in-8bit (load_in_4bit / load_in_8bit in Python).")
    if not load_in_4bit:
        extra = [flag for flag, given in (("--bnb-4bit-use-double-quant", double_quant), ("--bnb-4bit-compute-dtype", compute_dtype),
                                          ("--bnb-4bit-quant-type", quant_type != "nf4")) if given]
        if extra:
            raise ValueError(f"{', '.join(extra)} only apply to 4-bit quantization: add --load-in-4bit, or drop them.")
    if not (load_in_4bit or load_in_8bit):
        return None
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"Unknown 4-bit quantization type {quant_type!r}: choose one of {', '.join(QUANT_TYPES)}.")
    dtype = _compute_dtype(compute_dtype)
    check_bitsandbytes(4 if load_in_4bit else 8, quant_type, dtype)
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=dtype)


def _compute_dtype(value: Optional[str | torch.dtype]) -> torch.dtype:
    if value is None:
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if isinstance(value, torch.dtype):
        return value
    if value not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown compute dtype {value!r}: choose one of {', '.join(COMPUTE_DTYPES)}.")
    return COMPUTE_DTYPES[value]


def quantization_device() -> str:
    """Where this process's quantized model lives: its GPU (LOCAL_RANK under `accelerate launch`), else the CPU."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"


def check_bitsandbytes(bits: int, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32) -> None:
    """Raise `QuantizationUnavailableError`, naming the fix, unless bitsandbytes imports, is recent enough
    and runs a small quantized layer on this process's device."""
    flag = f"--load-in-{bits}bit"
    fix = f"or drop {flag} (load_in_{bits}bit) to train on the full-precision base."
    try:
        import bitsandbytes as bnb
    except Exception as err:  # ImportError, or a broken build failing while it loads
        raise QuantizationUnavailableError(
            f"{flag} needs bitsandbytes, which cannot be imported here ({type(err).__name__}: {err}). Install it with "
            f"pip install 'peft-federated[quantization]' (bitsandbytes>={MIN_BITSANDBYTES}), {fix}") from None
    from packaging.version import Version

    if Version(bnb.__version__) < Version(MIN_BITSANDBYTES):
        raise QuantizationUnavailableError(
            f"{flag} needs bitsandbytes>={MIN_BITSANDBYTES} (found {bnb.__version__}, which has no CPU kernels): "
            f"pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}', {fix}")
    device = quantization_device()
    try:
        if bits == 4:
            layer = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=compute_dtype, quant_type=quant_type)
        else:
            layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        layer = layer.to(device)  # quantizes
        out = layer(torch.ones(2, 64, dtype=compute_dtype, device=device))
        if not torch.isfinite(out).all():
            raise RuntimeError("a quantized layer gave non-finite outputs")
    except Exception as err:
        raise QuantizationUnavailableError(
            f"{flag}: bitsandbytes {bnb.__version__} cannot run a {bits}-bit layer on {device} ({type(err).__name__}: {err}). "
            f"Install a bitsandbytes build for this platform (pip install -U 'bitsandbytes>={MIN_BITSANDBYTES}'), {fix}") from None


def load_quantized(model_cls: Any, path: str, quantization: "BitsAndBytesConfig", gradient_checkpointing: bool = True, **kwargs: Any):
    """`model_cls.from_pretrained(path)` quantized by `quantization` on this process's device, prepared for
    LoRA training by `peft.prepare_model_for_kbit_training` (norms and other float weights in float32,
    input gradients for checkpointing; non-reentrant gradient checkpointing on unless `gradient_checkpointing=False`)."""
    from peft import prepare_model_for_kbit_training

    device = quantization_device()
    model = model_cls.from_pretrained(path, quantization_config=quantization, device_map={"": device}, **kwargs)
    if device == "cpu":
        keep_cpu_layout(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_cpu_layout(model: torch.nn.Module) -> int:
    """Turn off bitsandbytes' repacking of 4-bit weights for CPU inference; the number of layers.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a Linear4bit's weight the first time it runs
    in eval mode without gradients, rounding its scales (absmax) to bfloat16: evaluation then computes
    another function than training, and `state_dict()` converts the weight back without restoring the
    scales' layout, which corrupts the weight. Every party keeps the float32 scales instead."""
    count = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


__all__ = ["QuantizationUnavailableError", "check_bitsandbytes", "keep_cpu_layout", "load_quantized", "quantization_config",
           "quantization_device"]

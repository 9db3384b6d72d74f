"""TRL trainers with federated rounds (need `trl`): `FederatedSFTTrainer` and `FederatedDPOTrainer`.

Any other TRL trainer gets the same behaviour the same way: `class X(FederatedMixin, KTOTrainer)`.
Pass a PeftModel built from `federated_config.to_lora_config()` as `model` (not `peft_config=`):
the federation owns the adapter.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from datasets import Dataset
from trl import DPOTrainer, SFTTrainer

from peft_federated.adapter import lora_layers
from peft_federated.data.sft import SFTDataError
from peft_federated.trainer.trainer import FederatedMixin

logger = logging.getLogger(__name__)


class FederatedSFTTrainer(FederatedMixin, SFTTrainer):
    """TRL's `SFTTrainer` training a federated client's rounds, on every format it accepts: `text`,
    `prompt`/`completion` (the loss on the completion only, TRL's default), conversational `messages`
    (the tokenizer's chat template), or tokenized `input_ids` (see `peft_federated.data.sft`).

    Sequences longer than `max_length` are truncated (TRL's default). Examples left with no token that
    carries a label (a prompt that fills `max_length`) are dropped, as TRL does; when that leaves
    nothing, the trainer refuses at construction (`SFTDataError`), before any round trains, so the
    client never submits an update.
    """

    _tag_names = ["trl", "sft", "peft-federated"]

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        if not isinstance(dataset, Dataset):  # an IterableDataset: its length is unknown until it streams
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if args.max_length is not None and args.max_length < 2:
            raise SFTDataError(f"max_length={args.max_length} leaves no next token to predict: give --max-length 2 or more.")
        before = len(dataset)
        # Tokenize, label and truncate first (packing would hide examples left without labels), then pack.
        prepared = super()._prepare_dataset(dataset, processing_class, args, False, formatting_func, dataset_name)
        if len(prepared) == 0:
            lengths = _prompt_lengths(dataset, processing_class)
            raise SFTDataError(
                f"No {dataset_name} example keeps a token to learn from at max_length={args.max_length}: "
                + (f"every prompt fills it (prompts of {min(lengths)} to {max(lengths)} tokens), so no completion token "
                   "carries a label. Raise --max-length (max_length) above the prompts' length, or shorten the prompts."
                   if lengths else "raise --max-length (max_length).")
            )
        if len(prepared) < before:
            logger.warning("%d of %d %s examples dropped: their prompt fills max_length=%s, so no completion token "
                           "carries a label.", before - len(prepared), before, dataset_name, args.max_length)
        if packing:
            prepared = super()._prepare_dataset(prepared, processing_class, args, True, None, dataset_name)
        return prepared


def _prompt_lengths(dataset, tokenizer) -> list[int]:
    """Tokens in each prompt of a prompt/completion dataset (none for other formats)."""
    if "prompt" not in dataset.column_names:
        return []
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    lengths = []
    for prompt in dataset["prompt"]:
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        lengths.append(len(ids))
    return lengths


@contextmanager
def original_base(model) -> Iterator[None]:
    """The federation's base model, as it was before any round, for the duration: the original frozen
    weights of every LoRA module whose base an exact strategy changed (FedEx-LoRA, FLoRA) are put
    back, and a quantized base's change (a low-rank term beside the frozen weight) is switched off;
    then the federation's changed base again."""
    originals: dict[str, torch.Tensor] = model.__dict__.get("_federated_base_w0", {})
    terms = [t for t in model.__dict__.get("_federated_base_terms", {}).values() if hasattr(t, "scale")]
    layers = lora_layers(model) if originals else {}
    changed, scales = {}, [t.scale for t in terms]
    with torch.no_grad():
        for module, w0 in originals.items():
            weight = layers[module].get_base_layer().weight
            changed[module] = weight.detach().to("cpu", copy=True)
            weight.copy_(w0.to(weight.device, weight.dtype))
    for term in terms:
        term.scale = 0.0
    try:
        yield
    finally:
        for term, scale in zip(terms, scales):
            term.scale = scale
        with torch.no_grad():
            for module, value in changed.items():
                weight = layers[module].get_base_layer().weight
                weight.copy_(value.to(weight.device))


class FederatedDPOTrainer(FederatedMixin, DPOTrainer):
    """TRL's `DPOTrainer` training a federated client's rounds on preference data (`prompt`, `chosen`,
    `rejected`, as text or chat turns).

    The reference model is the federation's starting point: the base model with the adapter off and
    its original frozen weights, the same for every client and every round, so all clients optimize
    one DPO objective, as centralized DPO from that model would. It is not the round's global model
    (that would re-anchor the KL term every round) and not "the adapter switched off" of a later
    round: exact strategies fold a base change into the frozen weights (FedEx-LoRA, FLoRA), which
    would make that a different model each round. The reference log-probabilities are computed once,
    when the trainer is built (`precompute_ref_log_probs` is always on), with `original_base` in
    force; a separate `ref_model` is refused.
    """

    _tag_names = ["trl", "dpo", "peft-federated"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("ref_model") is not None:
            raise ValueError("FederatedDPOTrainer's reference is the federation's base model (the adapter off, the "
                             "original weights); do not pass ref_model.")
        training_args = kwargs.get("args") if "args" in kwargs else (args[2] if len(args) > 2 else None)
        if training_args is not None:
            training_args.precompute_ref_log_probs = True
        super().__init__(*args, **kwargs)
        if not self.precompute_ref_logps:
            raise ValueError("FederatedDPOTrainer needs a DPOConfig (precompute_ref_log_probs is set on it); pass args=DPOConfig(...).")

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        model = self.accelerator.unwrap_model(self.model)
        if "ref" in model.peft_config:  # TRL's copy of the starting adapter: the reference here is the base itself
            model.delete_adapter("ref")
            model.set_adapter("default")
        with original_base(model):
            return super()._precompute_ref_logps(dataset, name, batch_size)


__all__ = ["FederatedDPOTrainer", "FederatedSFTTrainer", "original_base"]

"""Fine-tuning methods: which weights train, and how LoRA adapters are added and folded back.

`prepare_for_finetune(model, spec)` is what every training worker calls after loading the base
weights and before DDP/FSDP wrapping; `spec` is the JSON-able `finetune` config section:

- `full`: every weight trains.
- `frozen`: transfer learning. `frozen.first_blocks = N` freezes the token embedding (and so a head
  tied to it), learned positions, the encoder of an encoder-decoder, and decoder blocks `0..N-1`;
  `frozen.last_blocks = N` freezes everything but the last N decoder blocks, the final norm and the
  head. With tied embeddings the head *is* the embedding matrix, so in `last_blocks` mode that shared
  matrix trains with the head.
- `lora`: `peft` wraps the named Linear modules (`lora.target_modules`, matched as module-name
  suffixes; default: every attention and feed-forward Linear the model has) with low-rank adapters;
  only the adapters train. `merge_lora` folds them into the base weights and returns the plain model
  (`Transformer` or `EncoderDecoder`) for export and evaluation.

Nothing here imports Ray or MLflow: the same functions run in a worker, on the driver and in tests.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

METHODS = ("full", "frozen", "lora")
BLOCK_LINEARS = ("qkv", "q", "kv", "proj", "gate", "up", "down")  # attention and feed-forward Linears


class FinetuneError(ValueError):
    """A fine-tuning spec that does not fit the model; the message names the config key."""


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise FinetuneError(f"frozen fine-tuning needs a model with a `blocks` ModuleList, got {type(model).__name__}")
    return blocks


def freeze_layers(model: nn.Module, first_blocks: int | None = None, last_blocks: int | None = None) -> nn.Module:
    """Set `requires_grad` for transfer learning (exactly one of the two counts)."""
    if (first_blocks is None) == (last_blocks is None):
        raise FinetuneError("finetune.frozen: set exactly one of first_blocks or last_blocks")
    blocks = _blocks(model)
    count = len(blocks)
    key, value = ("first_blocks", first_blocks) if first_blocks is not None else ("last_blocks", last_blocks)
    if value > count:
        raise FinetuneError(f"finetune.frozen.{key} = {value}: the model has only {count} blocks")
    if first_blocks is not None:
        for param in model.parameters():
            param.requires_grad_(True)
        bottom = [getattr(model, name) for name in ("embed", "positions", "encoder", "encoder_norm") if hasattr(model, name)]
        frozen_modules = [*bottom, *blocks[:first_blocks]]
        for module in frozen_modules:
            for param in module.parameters():
                param.requires_grad_(False)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        trained = [*blocks[count - last_blocks:], model.norm, model.head] if last_blocks else [model.norm, model.head]
        for module in trained:
            for param in module.parameters():
                param.requires_grad_(True)
    return model


def lora_config(settings: dict[str, Any]):
    # deferred: pulls in peft, slow to import; only this path needs it
    from peft import LoraConfig

    return LoraConfig(r=settings["rank"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                      target_modules=list(settings["target_modules"]), bias="none")


def lora_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """The Linear module names to adapt: the given ones (each must exist), else every block Linear."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    if targets is None:
        return sorted(names & set(BLOCK_LINEARS))
    unknown = [target for target in targets if target not in names]
    if unknown:
        raise FinetuneError(f"finetune.lora.target_modules = {list(targets)}: no Linear module named {unknown}; "
                            f"the model's Linear modules are {sorted(names)}")
    return list(targets)


def add_lora(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """Wrap the target Linear modules with LoRA adapters (peft); only adapters require grad."""
    # deferred: pulls in peft, slow to import; only this path needs it
    from peft import get_peft_model

    targets = lora_targets(model, settings.get("target_modules"))
    return get_peft_model(model, lora_config({**settings, "target_modules": targets}))


def prepare_for_finetune(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """The model to train for a `finetune` config section (see the module docstring)."""
    method = spec.get("method", "full")
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if method == "frozen":
        frozen = spec.get("frozen") or {}
        return freeze_layers(model, frozen.get("first_blocks"), frozen.get("last_blocks"))
    if method == "lora":
        return add_lora(model, spec["lora"])
    raise FinetuneError(f"finetune.method = {method!r}: expected one of {list(METHODS)}")


def is_lora(model: nn.Module) -> bool:
    # deferred: pulls in peft, slow to import; only this path needs it
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into the base weights: a plain model with the adapted model's function."""
    if not is_lora(model):
        return model
    return model.merge_and_unload()


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (a tied weight counts once)."""
    seen: set[int] = set()
    total = trainable = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return {"params_trainable": trainable, "params_total": total}

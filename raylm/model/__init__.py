"""The model family. Pure PyTorch: nothing here imports Ray or MLflow.

`build_model(config)` builds the architecture a config names: the decoder-only `Transformer`
(transformer.py) or the guide's `EncoderDecoder` (encoder_decoder.py). The config and presets
(config.py) load without torch: `raylm.config` validates the YAML `model` section into
`TransformerConfig`, and a command that only checks a config should not pay torch's start-up
(about 2 s), so the torch-backed names below are imported on first use (PEP 562 `__getattr__`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raylm.model.config import PRESETS, TransformerConfig, preset

if TYPE_CHECKING:
    import torch.nn as nn

    from raylm.model.transformer import Transformer


def as_config(config: TransformerConfig | dict[str, Any]) -> TransformerConfig:
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    raise TypeError(f"expected a TransformerConfig or a dict, got {type(config).__name__}")


def build_model(config: TransformerConfig | dict[str, Any]) -> "nn.Module":
    """The model for a config (or its `to_dict()`), dispatched on `arch`. Its vocabulary must be bound
    (`config.for_tokenizer(n)`, or a preset's / checkpoint's `vocab_size`)."""
    # deferred: pulls in torch, slow to import; only this path needs it
    from raylm.model.encoder_decoder import EncoderDecoder  # torch: deferred, see the module docstring
    from raylm.model.transformer import Transformer

    config = as_config(config)
    if config.vocab_size is None:
        raise ValueError("model.vocab_size is unset: bind it to the tokenizer's first (TransformerConfig.for_tokenizer)")
    if config.arch == "encoder-decoder":
        return EncoderDecoder(config)
    return Transformer(config)


def __getattr__(name: str) -> Any:
    if name == "Transformer":  # torch: deferred, see the module docstring
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.model.transformer import Transformer

        return Transformer
    raise AttributeError(f"module 'raylm.model' has no attribute {name!r}")


__all__ = ["PRESETS", "Transformer", "TransformerConfig", "as_config", "build_model", "preset"]

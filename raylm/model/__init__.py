"""The model family. Pure PyTorch: nothing here imports Ray or MLflow.

`build_model(config)` builds the architecture a config names: the decoder-only `Transformer`
(transformer.py) or the guide's `EncoderDecoder` (encoder_decoder.py).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from raylm.model.config import PRESETS, TransformerConfig, preset
from raylm.model.transformer import Transformer


def as_config(config: TransformerConfig | dict[str, Any]) -> TransformerConfig:
    if isinstance(config, TransformerConfig):
        return config
    if isinstance(config, dict):
        return TransformerConfig.from_dict(config)
    raise TypeError(f"expected a TransformerConfig or a dict, got {type(config).__name__}")


def build_model(config: TransformerConfig | dict[str, Any]) -> nn.Module:
    """The model for a config (or its `to_dict()`), dispatched on `arch`."""
    config = as_config(config)
    if config.arch == "encoder-decoder":
        from raylm.model.encoder_decoder import EncoderDecoder

        return EncoderDecoder(config)
    return Transformer(config)


__all__ = ["PRESETS", "Transformer", "TransformerConfig", "as_config", "build_model", "preset"]

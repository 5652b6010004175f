"""The model family. Pure PyTorch: nothing here imports Ray or MLflow."""

from raylm.model.transformer import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig"]

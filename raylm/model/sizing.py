"""Parameter and FLOP counts computed from a model config, without building the model.

The trainer uses `flops_per_token` for MFU and `raylm plan` for sizing, so both share one formula:
6 FLOPs per matmul parameter per token (forward + backward) plus the attention score and value
products, 12 * layers * context * width (PaLM's convention, no causal halving). Embedding lookups
cost no FLOPs; the output head is a matmul and counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.model.config import TransformerConfig


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def parameter_count(config: TransformerConfig) -> ParameterCount:
    d, vocab = config.d_model, config.vocab_size
    attention = 4 * d * d
    feed_forward = 3 * d * config.hidden
    norms = 2 * d
    blocks = config.n_layers * (attention + feed_forward + norms)
    embedding = vocab * d * (1 if config.tie_embeddings else 2)
    return ParameterCount(total=blocks + d + embedding, embedding=embedding)


def flops_per_token(config: TransformerConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward and backward) at context `seq_len` (default: the model's)."""
    d, context = config.d_model, seq_len or config.seq_len
    counts = parameter_count(config)
    matmul_params = counts.non_embedding - config.n_layers * 2 * d - d + config.vocab_size * d
    return 6 * matmul_params + 12 * config.n_layers * context * d

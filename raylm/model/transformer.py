"""The decoder-only transformer language model, whole in one file.

Token embedding, a positional encoding (rotary by default; learned or sinusoidal), N residual blocks of
causal self-attention and a feed-forward network, a final norm (pre-norm models), and an output head,
optionally tied to the embedding, and optionally soft-capped logits. Parts come from `layers.py` and are chosen by `TransformerConfig`.
The model knows nothing of Ray or MLflow: it takes token ids and returns logits.

`forward(tokens)` is the training path (one fused causal attention, flash attention on GPUs).
`attention_mask` (1 = real token, 0 = padding) handles left-padded batches, and `cache` the
incremental decoding of `generate.py`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from raylm.model.config import TransformerConfig
from raylm.model.layers import (Block, KVCache, PositionalEncoding, build_attention_mask, init_weights, make_norm,
                                positions_for, soft_cap)

__all__ = ["Transformer", "TransformerConfig"]


class Transformer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.arch != "decoder":
            raise ValueError(f"Transformer is the decoder-only model; model.arch = {config.arch!r} needs build_model")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = PositionalEncoding(config)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, causal=True, layer=i) for i in range(config.n_layers))
        self.norm = make_norm(config) if config.norm_position == "pre" else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config)

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """tokens [batch, time] -> logits [batch, time, vocab]. `attention_mask` [batch, keys so far]
        covers the cached tokens too; `cache` is filled and advanced."""
        time = tokens.shape[1]
        offset = cache.pos if cache is not None else 0
        positions = positions_for(attention_mask, offset, time, tokens.device)
        # Left padding may make a batch wider than seq_len; what must fit is each sequence's positions.
        length = offset + time if attention_mask is None else int(positions[:, -1].max()) + 1
        if length > self.config.seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than the model's seq_len {self.config.seq_len}")
        mask = None
        if attention_mask is not None or offset:  # else one fused causal attention (flash on GPUs)
            mask = build_attention_mask(attention_mask, time, offset + time, offset, causal=True, device=tokens.device)
        x, rope = self.positions(self.embed(tokens), positions)
        x = self.drop(x)
        for block in self.blocks:
            if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.advance(time)
        return soft_cap(self.head(self.norm(x)).float(), self.config.logit_softcap)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        weight = self.embed.weight
        return KVCache(self.config.n_layers, batch, self.config.kv_heads, max_len or self.config.seq_len,
                       self.config.head_dim, device=weight.device, dtype=weight.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

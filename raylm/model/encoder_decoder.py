"""The guide's full transformer: an encoder and a decoder joined by cross-attention, whole in one file.

The encoder is N blocks of (bidirectional self-attention, feed-forward) over the source; the decoder
is N blocks of (masked self-attention, encoder-decoder cross-attention, feed-forward) over the
target. Source and target share one vocabulary, one token embedding and, optionally, the output head.
With `position="sinusoidal"`, `activation="relu"`, `norm="layernorm"`, `norm_position="post"`,
`d_model=512, ffn_hidden=2048, n_heads=8, n_layers=6` it is the guide's (and Vaswani et al.'s) model.

Trained on packed rows by `lm_batch` (loss.py): by default the first `source_len` tokens are the source,
the decoder predicts the continuation (prefix-to-continuation); `seq2seq_objective="span_corruption"`
trains T5's way instead (span_corruption.py). For generation the encoder runs once and
its keys and values sit in the cache (`KVCache.cross`) next to the decoder's own.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from raylm.model.config import TransformerConfig
from raylm.model.layers import (Block, KVCache, PositionalEncoding, build_attention_mask, init_weights, make_norm,
                                positions_for, soft_cap)


class EncoderDecoder(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        if config.arch != "encoder-decoder":
            raise ValueError(f"EncoderDecoder needs model.arch = 'encoder-decoder', got {config.arch!r}")
        self.config = config
        pre_norm = config.norm_position == "pre"
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = PositionalEncoding(config)
        self.drop = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, causal=False, layer=i) for i in range(config.encoder_layers))
        self.encoder_norm = make_norm(config) if pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(config, causal=True, cross_attention=True, layer=i)
                                    for i in range(config.n_layers))
        self.norm = make_norm(config) if pre_norm else nn.Identity()
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.config)

    def _run(self, block: nn.Module, *args) -> torch.Tensor:
        if self.config.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _check_length(self, time: int, what: str) -> None:
        if time > self.config.seq_len:
            raise ValueError(f"{what} of {time} tokens is longer than the model's seq_len {self.config.seq_len}")

    def encode(self, source: torch.Tensor, source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """source [batch, source_time] -> memory [batch, source_time, d_model]."""
        time = source.shape[1]
        self._check_length(time, "source")
        mask = build_attention_mask(source_mask, time, time, 0, causal=False, device=source.device)
        x, rope = self.positions(self.embed(source), positions_for(source_mask, 0, time, source.device))
        x = self.drop(x)
        for block in self.encoder:
            x = self._run(block, x, rope, mask)
        return self.encoder_norm(x)

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor, source_mask: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Target tokens [batch, time] attending to `memory` -> logits [batch, time, vocab]."""
        time = tokens.shape[1]
        offset = cache.pos if cache is not None else 0
        self._check_length(offset + time, "target")
        mask = None
        if attention_mask is not None or offset:
            mask = build_attention_mask(attention_mask, time, offset + time, offset, causal=True, device=tokens.device)
        memory_mask = None if source_mask is None else source_mask[:, None, None, :].bool()
        x, rope = self.positions(self.embed(tokens), positions_for(attention_mask, offset, time, tokens.device))
        x = self.drop(x)
        for block in self.blocks:
            x = self._run(block, x, rope, mask, cache, memory, memory_mask)
        if cache is not None:
            cache.advance(time)
        return soft_cap(self.head(self.norm(x)).float(), self.config.logit_softcap)

    def forward(self, source: torch.Tensor, tokens: torch.Tensor, source_mask: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.decode(tokens, self.encode(source, source_mask), source_mask, attention_mask)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        weight = self.embed.weight
        return KVCache(self.config.n_layers, batch, self.config.kv_heads, max_len or self.config.seq_len,
                       self.config.head_dim, device=weight.device, dtype=weight.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

"""The transformer's parts, each selectable from `TransformerConfig`.

Norms (LayerNorm, RMSNorm), positional encodings (sinusoidal, learned, rotary with optional Llama 3.x
frequency scaling), multi-head attention
through `scaled_dot_product_attention` (causal, padding and cross-attention masks, grouped-query
attention, optional RMSNorm of queries and keys, a KV cache), feed-forward networks (ReLU, ReLU squared, GELU exact or
tanh-approximated as in GPT-2, SwiGLU), and the residual block in
post-norm (the original transformer's) or pre-norm form, with optional cross-attention for the
encoder-decoder's decoder. Everything is plain tensor code that `torch.compile` traces without breaks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from raylm.model.config import RopeScaling, TransformerConfig


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(logits / cap)`: logits stay within (-cap, cap), nearly unchanged well inside it."""
    return logits if cap is None else cap * torch.tanh(logits / cap)


def make_norm(config: TransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


# ----------------------------------------------------------------------------------------------
# Positions


def llama3_scaled_frequencies(inv_freq: torch.Tensor, scaling: RopeScaling) -> torch.Tensor:
    """Llama 3.x's RoPE scaling of the rotation frequencies (as Meta's reference code and `transformers`
    compute it): wavelengths above `original / low_freq_factor` are divided by `factor`, those below
    `original / high_freq_factor` kept, and those between interpolated smoothly. It changes the low
    frequencies at every position, not only past the original context."""
    original = scaling.original_max_position_embeddings
    wavelength = 2 * math.pi / inv_freq
    stretched = torch.where(wavelength > original / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelength - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    interpolated = (1 - smooth) * stretched / scaling.factor + smooth * stretched
    medium = (wavelength >= original / scaling.high_freq_factor) & (wavelength <= original / scaling.low_freq_factor)
    return torch.where(medium, interpolated, stretched)


def rotary_tables(seq_len: int, head_dim: int, theta: float, device=None,
                  scaling: RopeScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE's (cos, sin) over the whole head dimension [seq_len, head_dim], in the half-split layout
    (dimension i pairs with i + head_dim/2, as in Llama); sin carries the sign of the rotation.
    `scaling` applies Llama 3.x's frequency scaling."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if scaling is not None:
        inv_freq = llama3_scaled_frequencies(inv_freq, scaling)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return torch.cat([angles.cos(), angles.cos()], -1), torch.cat([-angles.sin(), angles.sin()], -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x1, x2) = (x[..., i], x[..., i + dim/2]) by position-dependent angles:
    (x1 cos - x2 sin, x2 cos + x1 sin) = x * cos + swap_halves(x) * signed sin.
    x: [batch, time, heads, dim]; cos, sin: [batch or 1, time, dim]. Two full-width multiplies on
    the heads' own layout: on CPU, half-width multiplies on transposed views cost twice as much."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return (x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin).type_as(x)


def sinusoidal_table(seq_len: int, d_model: int) -> torch.Tensor:
    """The guide's encoding: sin on even dimensions, cos on odd, wavelengths from 2*pi to 10000*2*pi."""
    position = torch.arange(seq_len, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(seq_len, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
    return table


def positions_for(attention_mask: torch.Tensor | None, offset: int, time: int, device) -> torch.Tensor:
    """Position ids [batch or 1, time]. With a (left-padding) mask over all keys so far, each
    sequence's first real token is position 0, so padded and unpadded sequences see the same positions."""
    if attention_mask is None:
        return torch.arange(offset, offset + time, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions[:, offset:offset + time]


class PositionalEncoding(nn.Module):
    """Adds learned or sinusoidal position vectors to the embeddings, or returns RoPE's rotations."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.kind = config.position
        if self.kind == "learned":
            self.table = nn.Embedding(config.seq_len, config.d_model)
        elif self.kind == "sinusoidal":
            self.register_buffer("sinusoid", sinusoidal_table(config.seq_len, config.d_model), persistent=False)
        else:
            cos, sin = rotary_tables(config.seq_len, config.head_dim, config.rope_theta,
                                     scaling=config.rope_scaling)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        if self.kind == "learned":
            return x + self.table(positions), None
        if self.kind == "sinusoidal":
            return x + self.sinusoid[positions].to(x.dtype), None
        return x, (self.rope_cos[positions], self.rope_sin[positions])


# ----------------------------------------------------------------------------------------------
# Attention


def build_attention_mask(key_valid: torch.Tensor | None, q_len: int, k_len: int, offset: int, causal: bool,
                   device) -> torch.Tensor | None:
    """Boolean [batch or 1, 1, q_len, k_len] mask (True: may attend) for queries at positions
    offset..offset+q_len over keys 0..k_len. Each query may always see itself, so a padded query row is
    never empty (an all-masked row would give NaN)."""
    mask = None
    q_index = torch.arange(offset, offset + q_len, device=device)[:, None]
    k_index = torch.arange(k_len, device=device)[None, :]
    if causal:
        mask = (k_index <= q_index)[None, None]
    if key_valid is not None:
        valid = key_valid[:, None, None, :k_len].bool()
        mask = valid if mask is None else mask & valid
        if causal:
            mask = mask | (k_index == q_index)[None, None]
    return mask


class KVCache:
    """Keys and values of every decoder layer, allocated at the first write to `max_len` positions
    (in the dtype the layer produces, so autocast works), plus the encoder-decoder's cross-attention
    keys and values (computed once from the encoder output)."""

    def __init__(self, n_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        self.shape = (batch, kv_heads, max_len, head_dim)
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.cross: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layers
        self.pos = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is None:
            self.keys[layer] = k.new_zeros(self.shape)
            self.values[layer] = v.new_zeros(self.shape)
        end = self.pos + k.shape[2]
        if end > self.shape[2]:
            raise ValueError(f"KV cache of {self.shape[2]} positions is full")
        self.keys[layer][:, :, self.pos:end] = k
        self.values[layer][:, :, self.pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, steps: int) -> None:
        self.pos += steps


class Attention(nn.Module):
    """Multi-head attention. Self-attention projects q, k, v with one fused matmul (`qkv`);
    cross-attention projects queries from the decoder (`q`) and keys/values from the encoder (`kv`)."""

    def __init__(self, config: TransformerConfig, cross: bool = False, layer: int = 0):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        self.cross, self.layer, self.dropout = cross, layer, config.dropout
        kv_width, qkv_bias = 2 * self.kv_heads * self.head_dim, config.attention_qkv_bias
        if cross:
            self.q = nn.Linear(config.d_model, config.d_model, bias=qkv_bias)
            self.kv = nn.Linear(config.d_model, kv_width, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(config.d_model, config.d_model + kv_width, bias=qkv_bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        if config.qk_norm:  # one weight of head_dim for all heads, as Qwen3's q_norm / k_norm
            self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps)
        self.qk_norm = config.qk_norm

    def _heads(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        batch, time, _ = x.shape
        return x.view(batch, time, heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                is_causal: bool, cache: KVCache | None = None, memory: torch.Tensor | None = None) -> torch.Tensor:
        batch, time, width = x.shape
        kv_width = self.kv_heads * self.head_dim
        if self.cross:
            q = self._heads(self.q(x), self.n_heads)
            if self.qk_norm:
                q = self.q_norm(q)
            cached = cache.cross[self.layer] if cache is not None else None
            if cached is None:
                k, v = self.kv(memory).split(kv_width, dim=-1)
                k, v = self._heads(k, self.kv_heads), self._heads(v, self.kv_heads)
                if self.qk_norm:
                    k = self.k_norm(k)
                if cache is not None:
                    cache.cross[self.layer] = (k, v)
            else:
                k, v = cached
        else:
            qkv = self.qkv(x)
            queries_keys, v = qkv.split([width + kv_width, kv_width], dim=-1)
            queries_keys = queries_keys.view(batch, time, self.n_heads + self.kv_heads, self.head_dim)
            if self.qk_norm:  # normed per head, before RoPE (Qwen3's order)
                q, k = queries_keys.split([self.n_heads, self.kv_heads], dim=2)
                queries_keys = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
            if rope is not None:  # queries and keys rotated together, before the heads move to dim 1
                queries_keys = apply_rotary(queries_keys, *rope)
            q, k = queries_keys.split([self.n_heads, self.kv_heads], dim=2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), self._heads(v, self.kv_heads)
            if cache is not None:
                k, v = cache.append(self.layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                             dropout_p=self.dropout if self.training else 0.0,
                                             enable_gqa=self.kv_heads != self.n_heads)
        return self.proj(out.transpose(1, 2).reshape(batch, time, width))


# ----------------------------------------------------------------------------------------------
# Feed-forward


class FeedForward(nn.Module):
    """SwiGLU (`down(silu(gate(x)) * up(x))`) or the guide's two-layer network `down(act(up(x)))`
    with ReLU, ReLU squared (`relu2`, Primer's), GELU or GELU's tanh approximation (`gelu_tanh`, GPT-2's); hidden width `config.hidden` (the guide's 512 -> 2048 is d_model=512, ffn_hidden=2048)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.activation = config.activation
        if self.activation == "swiglu":
            self.gate = nn.Linear(config.d_model, config.hidden, bias=config.bias)
        self.up = nn.Linear(config.d_model, config.hidden, bias=config.bias)
        self.down = nn.Linear(config.hidden, config.d_model, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        hidden = self.up(x)
        if self.activation == "relu":
            return self.down(F.relu(hidden))
        if self.activation == "relu2":
            return self.down(F.relu(hidden).square())
        return self.down(F.gelu(hidden, approximate="tanh" if self.activation == "gelu_tanh" else "none"))


# ----------------------------------------------------------------------------------------------
# The residual block


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual branch, normed before
    (pre-norm) or after the residual sum (post-norm)."""

    def __init__(self, config: TransformerConfig, causal: bool, cross_attention: bool = False, layer: int = 0):
        super().__init__()
        self.causal, self.pre_norm = causal, config.norm_position == "pre"
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer=layer)
        if cross_attention:
            self.cross_norm = make_norm(config)
            self.cross = Attention(config, cross=True, layer=layer)
        self.ffn_norm = make_norm(config)
        self.ffn = FeedForward(config)
        self.drop = nn.Dropout(config.dropout)

    def _residual(self, x: torch.Tensor, norm: nn.Module, branch) -> torch.Tensor:
        if self.pre_norm:
            return x + self.drop(branch(norm(x)))
        return norm(x + self.drop(branch(x)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self._residual(x, self.attn_norm, lambda h: self.attn(h, rope, mask, self.causal, cache))
        if memory is not None:
            x = self._residual(x, self.cross_norm, lambda h: self.cross(h, None, memory_mask, False, cache, memory))
        return self._residual(x, self.ffn_norm, self.ffn)


def init_weights(model: nn.Module, config: TransformerConfig) -> None:
    """Normal(0, init_std) matrices and embeddings, zero biases, unit norms; the projections that write
    into the residual stream (attention output, feed-forward down) scaled by 1/sqrt(2 * layers), or zero
    with `zero_init_projections`."""
    layers = config.n_layers + (config.encoder_layers if config.arch == "encoder-decoder" else 0)
    residual_std = config.init_std / math.sqrt(2 * layers)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            if name.endswith("bias"):
                nn.init.zeros_(param)
            else:
                nn.init.ones_(param)
            continue
        residual = name.endswith(("attn.proj.weight", "cross.proj.weight", "ffn.down.weight"))
        if residual and config.zero_init_projections:
            nn.init.zeros_(param)
            continue
        nn.init.normal_(param, mean=0.0, std=residual_std if residual else config.init_std)

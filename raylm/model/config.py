"""The model's own config (a plain dataclass) and the named size presets.

`TransformerConfig` is what a checkpoint stores as `model_config.json` and what every model class
takes. Each component the guide describes is a field: positional encoding (sinusoidal, learned,
rotary), feed-forward activation (ReLU, GELU, SwiGLU), norm (LayerNorm, RMSNorm) and its position
(post-norm as in the original transformer, or pre-norm), grouped-query attention, biases, weight
tying, and the architecture (`decoder` or `encoder-decoder`). The defaults are a modern decoder:
RoPE, SwiGLU, RMSNorm, pre-norm, no biases, tied embeddings.

The presets fill in sizes; `vocab_size` is normally replaced by the trained tokenizer's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

ARCHITECTURES = ("decoder", "encoder-decoder")
POSITIONS = ("rope", "learned", "sinusoidal")
ACTIVATIONS = ("swiglu", "gelu", "relu")
NORMS = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")


@dataclass
class TransformerConfig:
    vocab_size: int
    arch: str = "decoder"
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention: fewer key/value heads than query heads
    n_encoder_layers: int | None = None  # encoder-decoder only; default: n_layers
    ffn_hidden: int | None = None
    seq_len: int = 256
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    position: str = "rope"
    activation: str = "swiglu"
    norm: str = "rmsnorm"
    norm_position: str = "pre"
    norm_eps: float = 1e-5
    bias: bool = False
    init_std: float = 0.02
    activation_checkpointing: bool = False
    source_fraction: float = 0.5  # encoder-decoder: share of a packed row that is the source
    preset: str | None = None  # the preset the sizes came from (a label only)

    def __post_init__(self) -> None:
        problems = []
        for name, allowed in (("arch", ARCHITECTURES), ("position", POSITIONS), ("activation", ACTIVATIONS),
                              ("norm", NORMS), ("norm_position", NORM_POSITIONS)):
            if getattr(self, name) not in allowed:
                problems.append(f"model.{name} = {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.d_model % self.n_heads:
            problems.append(f"model.d_model = {self.d_model}: must be divisible by model.n_heads = {self.n_heads}")
        elif self.position == "rope" and self.head_dim % 2:
            problems.append(f"model.d_model / model.n_heads = {self.head_dim}: must be even for RoPE")
        if self.n_heads % self.kv_heads:
            problems.append(f"model.n_kv_heads = {self.n_kv_heads}: must divide model.n_heads = {self.n_heads}")
        if not 0 < self.source_fraction < 1:
            problems.append(f"model.source_fraction = {self.source_fraction}: expected a number in (0, 1)")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def encoder_layers(self) -> int:
        return self.n_encoder_layers or self.n_layers

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation == "swiglu":
            return 64 * math.ceil(8 * self.d_model / 3 / 64)  # SwiGLU's 2/3 of 4x, rounded to 64
        return 4 * self.d_model

    @property
    def source_len(self) -> int:
        """Encoder-decoder: source tokens of a packed row of seq_len + 1 tokens (the rest is the target)."""
        return max(1, min(self.seq_len - 1, round(self.seq_len * self.source_fraction)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


# Sizes. `gpt2-124m` is GPT-2 small exactly (learned positions, LayerNorm, GELU, biases; 124,439,808
# parameters with GPT-2's vocabulary); the larger ones are modern (RoPE, SwiGLU, RMSNorm, GQA).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2, seq_len=64),
    "laptop": dict(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, seq_len=256),
    "gpt2-124m": dict(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, seq_len=1024, position="learned",
                      activation="gelu", norm="layernorm", bias=True, ffn_hidden=3072),
    "350m": dict(vocab_size=32768, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, seq_len=2048),
    "1b": dict(vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, seq_len=2048,
               ffn_hidden=8192, rope_theta=500000.0),
}


def preset(name: str, **overrides: Any) -> TransformerConfig:
    """The named preset as a config, with `overrides` on top (e.g. the tokenizer's vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset = {name!r}: expected one of {', '.join(PRESETS)}")
    return TransformerConfig.from_dict({**PRESETS[name], "preset": name, **overrides})


def with_vocab(config: TransformerConfig, vocab_size: int) -> TransformerConfig:
    return replace(config, vocab_size=vocab_size)

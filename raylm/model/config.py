"""The model's config (a validated pydantic dataclass) and the named size presets, defined once.

`TransformerConfig` is the YAML `model` section (raylm/config.py validates that section straight into
it), what a checkpoint stores as `model_config.json` and what every model class takes. A new model
option is one field here (with its constraint and description), and its use in the model code. Each component the guide describes is a field: positional encoding (sinusoidal, learned,
rotary), feed-forward activation (ReLU, GELU, SwiGLU), norm (LayerNorm, RMSNorm) and its position
(post-norm as in the original transformer, or pre-norm), grouped-query attention, biases, weight
tying, and the architecture (`decoder` or `encoder-decoder`). The recipe options of raylm/recipe.py are
fields too: `qk_norm`, `logit_softcap`, `zero_init_projections` and the `relu2` activation (all off by
default, and quiet at their defaults, so configs that do not use them hash as before). The defaults are a modern decoder:
RoPE, SwiGLU, RMSNorm, pre-norm, no biases, tied embeddings. Two options exist for the base models
people import from Hugging Face (raylm/model/hf.py): `qkv_bias` (biases on the query/key/value
projections only, Qwen2's layout) and `rope_scaling` (Llama 3.x's RoPE frequency scaling); the
activation `gelu_tanh` is GPT-2's tanh approximation of GELU. Both keys are left out of the `model`
section (so of stage hashes) at their defaults (`QUIET_AT_DEFAULT`), and a `model_config.json` written
before they existed loads with those defaults.

`preset` fills in the sizes of a named model (keys given win). `vocab_size` is normally unset in the
YAML and bound to the trained tokenizer's by `for_tokenizer` (plus the sentinel ids span corruption
reserves on top of it, see `span_sentinels`). Pydantic is the only dependency: no Ray, no MLflow.

The encoder-decoder trains on one of two sequence-to-sequence objectives over the packed rows
(`seq2seq_objective`): `prefix` (the first `source_fraction` of a row is the source, the rest the
target) or `span_corruption` (T5: `noise_density` of the tokens, in spans of mean length
`mean_span_length`, are replaced by sentinels in the source and are the target); see loss.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields, replace
from typing import Any

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass
from pydantic_core import ArgsKwargs

ARCHITECTURES = ("decoder", "encoder-decoder")
POSITIONS = ("rope", "learned", "sinusoidal")
ACTIVATIONS = ("swiglu", "gelu", "gelu_tanh", "relu", "relu2")
NORMS = ("rmsnorm", "layernorm")
NORM_POSITIONS = ("pre", "post")
# Keys a base checkpoint and a run that starts from it may disagree on: they shape no weight.
NON_ARCHITECTURE_KEYS = ("dropout", "activation_checkpointing", "init_std", "preset", "zero_init_projections")
# ...and, for comparing stored weights with a config: the vocabulary (bound to the tokenizer later) and the
# training objective's settings.
WEIGHT_FREE_KEYS = (*NON_ARCHITECTURE_KEYS, "vocab_size", "source_fraction", "seq2seq_objective", "noise_density",
                    "mean_span_length")
SEQ2SEQ_OBJECTIVES = ("prefix", "span_corruption")
ROPE_SCALING_TYPES = ("llama3",)
# Keys added after workspaces existed: left out of `section()` (stage hashes, MLflow params) while at their
# defaults, so every config that does not use them hashes as it always did.
QUIET_AT_DEFAULT = ("qkv_bias", "rope_scaling", "qk_norm", "logit_softcap", "zero_init_projections")


def span_counts(row_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) that span corruption drops from every packed row of `row_len` tokens.
    The counts are the same for every row (as in T5), so corrupted batches stack without padding."""
    noise = min(max(round(row_len * noise_density), 1), row_len - 1)
    spans = min(max(round(noise / mean_span_length), 1), noise)
    return noise, spans


def span_corruption_problems(arch: str, seq_len: int, vocab_size: int | None, noise_density: float,
                             mean_span_length: float) -> list[str]:
    """Why `seq2seq_objective = "span_corruption"` cannot work for these settings (empty: it can)."""
    problems = []
    if arch != "encoder-decoder":
        return [f"model.seq2seq_objective = 'span_corruption' needs model.arch = 'encoder-decoder', got {arch!r}"]
    if not 0 < noise_density < 1:
        problems.append(f"model.noise_density = {noise_density}: expected a number in (0, 1)")
    if not mean_span_length >= 1:
        problems.append(f"model.mean_span_length = {mean_span_length}: expected a number >= 1")
    if problems:
        return problems
    row = seq_len + 1
    noise, spans = span_counts(row, noise_density, mean_span_length)
    source, target = row - noise + spans, noise + spans
    if source > seq_len or target > seq_len:
        problems.append(f"model.noise_density = {noise_density}, model.mean_span_length = {mean_span_length}: span "
                        f"corruption of a row of seq_len + 1 = {row} tokens drops {noise} tokens in {spans} spans, "
                        f"giving a source of {source} and a target of {target} tokens; both must fit model.seq_len = "
                        f"{seq_len} (drop more tokens than spans: raise noise_density or mean_span_length)")
    if vocab_size is not None and vocab_size <= spans:
        problems.append(f"model.vocab_size = {vocab_size} cannot hold the {spans} sentinel ids that "
                        f"model.seq2seq_objective = 'span_corruption' reserves at its top")
    return problems


def _preset_sizes(data: Any) -> Any:
    """Before validation: a named `preset` fills in the sizes the data does not give (keys given win).
    The preset's vocabulary is not filled in: the trained tokenizer's is (see `for_tokenizer`)."""
    kwargs = data.kwargs if isinstance(data, ArgsKwargs) else data
    if not isinstance(kwargs, dict) or kwargs.get("preset") is None:
        return data
    name = kwargs["preset"]
    if name not in PRESETS:
        raise ValueError(f"model.preset = {name!r}: expected one of {', '.join(PRESETS)}")
    sizes = {key: value for key, value in PRESETS[name].items() if key != "vocab_size"}
    merged = {**sizes, **kwargs}
    return ArgsKwargs(data.args, merged) if isinstance(data, ArgsKwargs) else merged


@dataclass(config=ConfigDict(extra="forbid"))
class RopeScaling:
    """Llama 3.x's RoPE frequency scaling (`rope_type: llama3`, the names of Hugging Face's
    `rope_scaling`): wavelengths longer than `original_max_position_embeddings / low_freq_factor` are
    stretched by `factor`, those shorter than `original_max_position_embeddings / high_freq_factor` are
    kept, and the ones between are interpolated. The defaults are Llama 3.1's (Llama 3.2 uses factor 32)."""

    rope_type: str = Field("llama3", description="llama3 (the only scaling raylm computes)")
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, gt=0, description="context length of pretraining before scaling")


@dataclass(config=ConfigDict(extra="forbid", validate_assignment=True))
class TransformerConfig:
    """The transformer, validated: the YAML `model` section, a checkpoint's `model_config.json` and what
    every model class takes. Range errors come from the field constraints, choices and cross-field rules
    from `_check`; each message names the dotted key `model.<name>`."""

    vocab_size: int | None = Field(None, gt=0, description="default: the trained tokenizer's ids (plus span "
                                   "corruption's sentinels); set it to keep a larger vocabulary, e.g. GPT-2's 50257")
    arch: str = Field("decoder", description="decoder | encoder-decoder")
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0, description="decoder layers (and encoder layers unless n_encoder_layers is set)")
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="key/value heads for grouped-query attention (default: n_heads)")
    n_encoder_layers: int | None = Field(None, gt=0, description="encoder-decoder: encoder layers (default: n_layers)")
    ffn_hidden: int | None = Field(None, gt=0, description="feed-forward width (default: 8/3 d_model for SwiGLU, 4 d_model otherwise)")
    seq_len: int = Field(256, ge=2, description="context length; packed sequences hold seq_len + 1 tokens")
    dropout: float = Field(0.0, ge=0, lt=1)
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = Field(None, description="Llama 3.x RoPE scaling (rope_type llama3, factor, "
                                             "low_freq_factor, high_freq_factor, original_max_position_embeddings)")
    position: str = Field("rope", description="rope | learned | sinusoidal")
    activation: str = Field("swiglu", description="swiglu | gelu | gelu_tanh | relu | relu2 (ReLU squared, "
                            "Primer / modded-nanogpt)")
    norm: str = Field("rmsnorm", description="rmsnorm | layernorm")
    norm_position: str = Field("pre", description="pre | post (the original transformer's)")
    norm_eps: float = Field(1e-5, gt=0)
    bias: bool = Field(False, description="biases in linear layers and LayerNorm")
    qkv_bias: bool = Field(False, description="biases on the attention's query/key/value projections even "
                           "without `bias` (Qwen2)")
    init_std: float = Field(0.02, gt=0, description="std of the normal init; residual projections get / sqrt(2 * layers)")
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys before RoPE (Qwen3, OLMo 2, "
                          "modded-nanogpt): bounds the attention logits, so higher learning rates stay stable")
    logit_softcap: float | None = Field(None, gt=0, description="output logits become cap * tanh(logits / cap) "
                                        "(Gemma 2, modded-nanogpt: 15-30); unset: no capping")
    zero_init_projections: bool = Field(False, description="zero-initialise the projections that write into the "
                                        "residual stream (attention output, feed-forward down): each block starts "
                                        "as the identity")
    activation_checkpointing: bool = Field(False, description="recompute each block in the backward pass to save memory")
    source_fraction: float = Field(0.5, description="encoder-decoder, prefix objective: share of each packed row used as the source")
    seq2seq_objective: str = Field("prefix", description="encoder-decoder training objective: prefix (to continuation) "
                                   "or span_corruption (T5); evaluation stays on prefix")
    noise_density: float = Field(0.15, description="span corruption: share of each row's tokens dropped into spans")
    mean_span_length: float = Field(3.0, description="span corruption: mean length of a dropped span")
    preset: str | None = Field(None, description="named size: tiny, laptop, gpt2-124m, 350m, 1b (keys given here win)")

    @model_validator(mode="wrap")
    @classmethod
    def _preset_and_explicit_keys(cls, data: Any, handler: Any) -> "TransformerConfig":
        """Fill in the preset's sizes, and remember which keys were given (preset sizes included):
        fine-tuning checks those against the base model (`explicit_keys`)."""
        if isinstance(data, cls):  # an assignment (validate_assignment); `_mark_assigned` adds its key
            given = data.explicit_keys
            config = handler(data)
            object.__setattr__(config, "_explicit_keys", given)
            return config
        data = _preset_sizes(data)
        given = (data.kwargs or {}) if isinstance(data, ArgsKwargs) else data if isinstance(data, dict) else {}
        config = handler(data)
        object.__setattr__(config, "_explicit_keys", frozenset(given))
        return config

    @property
    def explicit_keys(self) -> frozenset[str]:
        """The keys this config was given (by YAML, `--set`, a preset or the constructor), not defaulted."""
        return self.__dict__.get("_explicit_keys", frozenset())

    @model_validator(mode="after")
    def _check(self) -> "TransformerConfig":
        problems = []
        for name, allowed in (("arch", ARCHITECTURES), ("position", POSITIONS), ("activation", ACTIVATIONS),
                              ("norm", NORMS), ("norm_position", NORM_POSITIONS)):
            if getattr(self, name) not in allowed:
                problems.append(f"model.{name} = {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.d_model % self.n_heads:
            problems.append(f"model.d_model = {self.d_model}: must be divisible by model.n_heads = {self.n_heads}")
        elif self.position == "rope" and self.head_dim % 2:
            problems.append(f"model.d_model / model.n_heads = {self.head_dim}: must be even for RoPE")
        if self.rope_scaling is not None:
            problems += self._rope_scaling_problems()
        if self.n_heads % self.kv_heads:
            problems.append(f"model.n_kv_heads = {self.n_kv_heads}: must divide model.n_heads = {self.n_heads}")
        if not 0 < self.source_fraction < 1:
            problems.append(f"model.source_fraction = {self.source_fraction}: expected a number in (0, 1)")
        if self.seq2seq_objective not in SEQ2SEQ_OBJECTIVES:
            problems.append(f"model.seq2seq_objective = {self.seq2seq_objective!r}: expected one of "
                            f"{', '.join(SEQ2SEQ_OBJECTIVES)}")
        elif self.seq2seq_objective == "span_corruption":
            problems += span_corruption_problems(self.arch, self.seq_len, self.vocab_size, self.noise_density,
                                                 self.mean_span_length)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _rope_scaling_problems(self) -> list[str]:
        scaling, problems = self.rope_scaling, []
        if self.position != "rope":
            problems.append(f"model.rope_scaling needs model.position = 'rope', got {self.position!r}")
        if scaling.rope_type not in ROPE_SCALING_TYPES:
            problems.append(f"model.rope_scaling.rope_type = {scaling.rope_type!r}: expected one of "
                            f"{', '.join(ROPE_SCALING_TYPES)}")
        if scaling.high_freq_factor <= scaling.low_freq_factor:
            problems.append(f"model.rope_scaling.high_freq_factor = {scaling.high_freq_factor}: expected more than "
                            f"model.rope_scaling.low_freq_factor = {scaling.low_freq_factor}")
        return problems

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def attention_qkv_bias(self) -> bool:
        """Whether the query/key/value projections carry biases (`bias` gives every linear layer one)."""
        return self.bias or self.qkv_bias

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

    @property
    def span_sentinels(self) -> int:
        """Span corruption: sentinel ids reserved at the top of the vocabulary (0 for the prefix objective).
        Sentinel i (marking the i-th dropped span of a row) is `vocab_size - 1 - i`, as T5's extra ids."""
        if self.seq2seq_objective != "span_corruption":
            return 0
        return span_counts(self.seq_len + 1, self.noise_density, self.mean_span_length)[1]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransformerConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def for_tokenizer(self, tokens: int) -> "TransformerConfig":
        """This config bound to a tokenizer of `tokens` ids: unset `vocab_size` becomes those ids plus span
        corruption's sentinel ids on top (the tokenizer never produces them); a set one must hold both."""
        if self.vocab_size is None:
            return replace(self, vocab_size=tokens + self.span_sentinels)
        if self.vocab_size - self.span_sentinels < tokens:
            sentinels = f" plus the {self.span_sentinels} span-corruption sentinels (model.seq2seq_objective)" \
                if self.span_sentinels else ""
            raise ValueError(f"model.vocab_size = {self.vocab_size} is smaller than the tokenizer's {tokens}{sentinels}")
        return self

    def section(self) -> dict[str, Any]:
        """The YAML `model` section as JSON-able data (stage hashes, MLflow params): an unset vocabulary
        is left out, so a section that never names one hashes as it always did, and so are the
        `QUIET_AT_DEFAULT` keys at their defaults."""
        data = self.to_dict()
        if data["vocab_size"] is None:
            del data["vocab_size"]
        for key in QUIET_AT_DEFAULT:
            if data[key] == self.__pydantic_fields__[key].default:
                del data[key]
        return data


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


def _mark_assigned(validated_setattr: Any) -> Any:
    """`config.key = value` validates (pydantic) and then counts `key` as given (`explicit_keys`)."""
    def setattr_and_mark(self: TransformerConfig, name: str, value: Any) -> None:
        validated_setattr(self, name, value)
        if name in self.__pydantic_fields__:
            object.__setattr__(self, "_explicit_keys", self.explicit_keys | {name})
    return setattr_and_mark


TransformerConfig.__setattr__ = _mark_assigned(TransformerConfig.__setattr__)

"""Hugging Face interop: export a raylm decoder as a `transformers` model folder, and import one back.

Four architectures cover what a raylm decoder can be, and the base models people start from:
- Llama (`LlamaForCausalLM`): rotary positions (optionally with Llama 3.x's `llama3` frequency scaling,
  as Llama 3.1/3.2 publish), RMSNorm, SwiGLU, pre-norm, optional grouped-query attention and biases;
- Qwen2 (`Qwen2ForCausalLM`): the Llama layout with biases on the query/key/value projections only
  (raylm's `qkv_bias`), full attention (a sliding window is refused);
- Qwen3 (`Qwen3ForCausalLM`): the Llama layout with RMSNorm on each head's queries and keys before RoPE
  (raylm's `qk_norm`), no biases;
- GPT-2 (`GPT2LMHeadModel`): learned positions, LayerNorm, GELU (exact, or the tanh approximation GPT-2
  was trained with: `gelu_new` / `gelu_pytorch_tanh`, raylm's `gelu_tanh`) or ReLU, pre-norm, full
  multi-head attention (a raylm model without biases exports zero biases).
Any other combination (sinusoidal positions, post-norm, mixed parts, the encoder-decoder, and the recipe
options none of these computes: `logit_softcap`, the `relu2` activation, `qk_norm` outside the Qwen3
layout) is refused with the reason, and so is an imported `config.json` whose values raylm does not compute (another
`rope_type`, activation or model type, a sliding window), naming the key and its value. The folder holds
`config.json`, `model.safetensors` (float32) and the tokenizer (`tokenizer.json` +
`tokenizer_config.json`), so `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoTokenizer.from_pretrained(folder)` load it offline. `gelu_tanh` exports as `gelu_pytorch_tanh`,
the same kernel raylm runs (`gelu_new` computes the same function, equal to float rounding).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from raylm.data.tokenizer import save_tokenizer, tokenizer_from_json
from raylm.model import as_config
from raylm.model.config import RopeScaling, TransformerConfig
from raylm.model.transformer import Transformer

SPECIAL_TOKENS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gpt2")
# GPT-2's `activation_function` values -> raylm's `activation`
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
EXPORTED_GPT2_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


class ExportError(ValueError):
    """A model that neither the Llama, Qwen2, Qwen3 nor the GPT-2 architecture of `transformers` can express."""


def hf_architecture(config: TransformerConfig) -> str:
    """`llama`, `qwen2`, `qwen3` or `gpt2`, or ExportError naming what does not fit."""
    if config.arch != "decoder":
        raise ExportError(f"model.arch = {config.arch!r}: only decoder models export to a causal-LM folder")
    if config.norm_position != "pre":
        raise ExportError("model.norm_position = 'post': Llama and GPT-2 are both pre-norm")
    if config.logit_softcap is not None:
        raise ExportError(f"model.logit_softcap = {config.logit_softcap}: Llama, Qwen2/3 and GPT-2 do not cap "
                          "their logits (the exported model would compute different outputs)")
    if config.activation == "relu2":
        raise ExportError("model.activation = 'relu2': no exported architecture has a ReLU-squared feed-forward "
                          "(Llama/Qwen use SwiGLU, GPT-2 a two-layer GELU/ReLU network)")
    parts = (config.position, config.norm, config.activation)
    if config.qk_norm:
        if parts != ("rope", "rmsnorm", "swiglu") or config.bias or config.qkv_bias:
            raise ExportError("model.qk_norm = true: only Qwen3 normalises queries and keys, and it needs "
                              "rope/rmsnorm/swiglu without biases (model.bias and model.qkv_bias false); got "
                              f"{'/'.join(parts)}, bias {config.bias}, qkv_bias {config.qkv_bias}")
        return "qwen3"
    if parts == ("rope", "rmsnorm", "swiglu"):
        return "qwen2" if config.qkv_bias and not config.bias else "llama"
    if config.position == "learned" and config.norm == "layernorm" and config.activation in EXPORTED_GPT2_ACTIVATION:
        if config.kv_heads != config.n_heads:
            raise ExportError(f"model.n_kv_heads = {config.n_kv_heads}: GPT-2 has no grouped-query attention")
        return "gpt2"
    raise ExportError(
        f"model.position/norm/activation = {'/'.join(parts)}: export needs rope/rmsnorm/swiglu (Llama) "
        "or learned/layernorm/gelu|gelu_tanh|relu (GPT-2)")


# ----------------------------------------------------------------------------------------------
# Configs


def _special_ids(tokenizer_json: str | None) -> dict[str, int | None]:
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer_json is None:
        return ids

    tokenizer = Tokenizer.from_str(tokenizer_json)
    for key, token in SPECIAL_TOKENS.items():
        ids[key + "_id"] = tokenizer.token_to_id(token)
    return ids


def _rope_kwargs(config: TransformerConfig) -> dict[str, Any]:
    """RoPE as `transformers` configs take it: `rope_theta`, plus `rope_scaling` when scaled (the key
    transformers 4.x reads; 5.x moves both into `rope_parameters` on its own)."""
    if config.rope_scaling is None:
        return {"rope_theta": config.rope_theta}
    return {"rope_theta": config.rope_theta, "rope_scaling": asdict(config.rope_scaling)}


def hf_config(config: TransformerConfig, tokenizer_json: str | None = None):
    # deferred: pulls in transformers, slow to import; only this path needs it
    import transformers

    common = dict(vocab_size=config.vocab_size, tie_word_embeddings=config.tie_embeddings, dtype="float32",
                  **_special_ids(tokenizer_json))
    architecture = hf_architecture(config)
    decoder = dict(hidden_size=config.d_model, intermediate_size=config.hidden, num_hidden_layers=config.n_layers,
                   num_attention_heads=config.n_heads, num_key_value_heads=config.kv_heads, hidden_act="silu",
                   max_position_embeddings=config.seq_len, rms_norm_eps=config.norm_eps,
                   initializer_range=config.init_std, **_rope_kwargs(config), **common)
    if architecture == "llama":
        out = transformers.LlamaConfig(head_dim=config.head_dim, attention_bias=config.bias, mlp_bias=config.bias,
                                       **decoder)
        out.architectures = ["LlamaForCausalLM"]
    elif architecture == "qwen2":
        out = transformers.Qwen2Config(use_sliding_window=False, **decoder)
        out.architectures = ["Qwen2ForCausalLM"]
    elif architecture == "qwen3":
        out = transformers.Qwen3Config(head_dim=config.head_dim, attention_bias=False, use_sliding_window=False,
                                       **decoder)
        out.architectures = ["Qwen3ForCausalLM"]
    else:
        out = transformers.GPT2Config(
            n_embd=config.d_model, n_layer=config.n_layers, n_head=config.n_heads, n_inner=config.hidden,
            n_positions=config.seq_len, activation_function=EXPORTED_GPT2_ACTIVATION[config.activation],
            layer_norm_epsilon=config.norm_eps, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            initializer_range=config.init_std, **common)
        out.architectures = ["GPT2LMHeadModel"]
    return out


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """(rope_theta, Llama 3.x scaling or None) from `rope_parameters` (transformers 5) or `rope_scaling`
    with a top-level `rope_theta` (4.x and the published configs), read as transformers reads them."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ExportError(f"config.json {key} = {params!r}: expected an object")
    nested = sorted(name for name, value in params.items() if isinstance(value, dict))
    if nested:
        raise ExportError(f"config.json {key} has one RoPE per layer type ({', '.join(nested)}): raylm has one for "
                          "all layers")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10000.0)
    partial = params.get("partial_rotary_factor") or hf.get("partial_rotary_factor") or 1.0
    if partial != 1.0:
        raise ExportError(f"config.json partial_rotary_factor = {partial!r}: raylm rotates the whole head (1.0)")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ExportError(f"config.json {key}.rope_type = {kind!r}: raylm computes 'default' (unscaled) and "
                          "'llama3' RoPE")
    original = hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") \
        or hf.get("max_position_embeddings")
    try:
        scaling = RopeScaling(factor=params["factor"], low_freq_factor=params["low_freq_factor"],
                              high_freq_factor=params["high_freq_factor"], original_max_position_embeddings=original)
    except KeyError as missing:
        raise ExportError(f"config.json {key} of rope_type 'llama3' lacks {missing}") from None
    except ValidationError as error:
        where = ", ".join(f"{key}.{'.'.join(map(str, e['loc']))} = {e['input']!r} ({e['msg']})" for e in error.errors())
        raise ExportError(f"config.json {where}") from None
    if scaling.high_freq_factor <= scaling.low_freq_factor:
        raise ExportError(f"config.json {key}.high_freq_factor = {scaling.high_freq_factor}: expected more than "
                          f"low_freq_factor = {scaling.low_freq_factor}")
    return theta, scaling


def _refuse_sliding_window(hf: dict[str, Any]) -> None:
    if hf.get("use_sliding_window"):
        raise ExportError(f"config.json use_sliding_window = {hf['use_sliding_window']!r}: raylm attends over the "
                          "whole context (no sliding window)")
    windowed = sorted({kind for kind in hf.get("layer_types") or [] if kind != "full_attention"})
    if windowed:
        raise ExportError(f"config.json layer_types has {', '.join(map(repr, windowed))}: raylm has only "
                          "'full_attention' layers")


def _refuse_gpt2_attention_variants(hf: dict[str, Any]) -> None:
    for key, usual in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
        if hf.get(key, usual) != usual:
            raise ExportError(f"config.json {key} = {hf[key]!r}: raylm's attention needs {usual!r}")


def config_from_hf(hf: dict[str, Any]) -> TransformerConfig:
    """A raylm config from a `config.json` of a Llama, Qwen2, Qwen3 or GPT-2 model; ExportError naming the key
    and value for anything raylm would compute differently."""
    kind = hf.get("model_type")
    common = dict(vocab_size=hf["vocab_size"], tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
    if kind in ("llama", "qwen2", "qwen3"):
        if hf.get("hidden_act", "silu") != "silu":
            raise ExportError(f"config.json hidden_act = {hf['hidden_act']!r}: raylm's SwiGLU needs 'silu'")
        theta, scaling = _rope_from_hf(hf)
        if kind == "llama":
            if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
                raise ExportError(f"config.json attention_bias = {hf.get('attention_bias', False)!r} differs from "
                                  f"mlp_bias = {hf.get('mlp_bias', False)!r}: raylm has one `bias` switch (and "
                                  "`qkv_bias`, which Llama's attention_bias does not match: it biases o_proj too)")
            bias, qkv_bias = bool(hf.get("attention_bias", False)), False
        elif kind == "qwen3":  # no biases, RMSNorm on queries and keys
            _refuse_sliding_window(hf)
            if hf.get("attention_bias", False):
                raise ExportError(f"config.json attention_bias = {hf['attention_bias']!r}: raylm's qk_norm layout "
                                  "(Qwen3) has no attention biases")
            bias, qkv_bias = False, False
        else:  # Qwen2: q/k/v projections with biases, o_proj and the MLP without
            _refuse_sliding_window(hf)
            bias, qkv_bias = False, True
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            raise ExportError(f"config.json head_dim = {hf['head_dim']}: raylm needs hidden_size / num_attention_heads")
        return TransformerConfig(
            d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads, ffn_hidden=hf["intermediate_size"],
            seq_len=hf["max_position_embeddings"], rope_theta=theta, rope_scaling=scaling,
            norm_eps=hf.get("rms_norm_eps", 1e-6), bias=bias, qkv_bias=qkv_bias, qk_norm=kind == "qwen3", **common)
    if kind == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        if activation not in GPT2_ACTIVATIONS:
            raise ExportError(f"config.json activation_function = {activation!r}: raylm computes "
                              f"{', '.join(map(repr, GPT2_ACTIVATIONS))}")
        _refuse_gpt2_attention_variants(hf)
        return TransformerConfig(
            d_model=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
            ffn_hidden=hf.get("n_inner") or 4 * hf["n_embd"], seq_len=hf["n_positions"], position="learned",
            norm="layernorm", activation=GPT2_ACTIVATIONS[activation], bias=True,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), **common)
    raise ExportError(f"config.json model_type = {kind!r}: raylm imports "
                      f"{', '.join(map(repr, SUPPORTED_MODEL_TYPES[:-1]))} and {SUPPORTED_MODEL_TYPES[-1]!r}")


# ----------------------------------------------------------------------------------------------
# Weights: raylm name -> transformers name, per layer


def _weight_map(architecture: str):
    """The weight mapping of an architecture: Qwen2 and Qwen3 name their weights as Llama does."""
    return _gpt2_weights if architecture == "gpt2" else _llama_weights


def _llama_weights(config: TransformerConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    d, kv = config.d_model, config.kv_heads * config.head_dim
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "attn_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
        if config.qk_norm:
            out[theirs + "self_attn.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
            out[theirs + "self_attn.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
        for kind, present in (("weight", True), ("bias", config.attention_qkv_bias)):
            if present:
                q, k, v = state[ours + f"attn.qkv.{kind}"].split([d, kv, kv], dim=0)
                out[theirs + f"self_attn.q_proj.{kind}"] = q
                out[theirs + f"self_attn.k_proj.{kind}"] = k
                out[theirs + f"self_attn.v_proj.{kind}"] = v
        for kind in ("weight", "bias") if config.bias else ("weight",):
            out[theirs + f"self_attn.o_proj.{kind}"] = state[ours + f"attn.proj.{kind}"]
            for name in ("gate", "up", "down"):
                out[theirs + f"mlp.{name}_proj.{kind}"] = state[ours + f"ffn.{name}.{kind}"]
    return out


def _gpt2_weights(config: TransformerConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    def bias(name: str, width: int) -> torch.Tensor:
        return state.get(name, torch.zeros(width))

    d, hidden = config.d_model, config.hidden
    out = {"transformer.wte.weight": state["embed.weight"], "transformer.wpe.weight": state["positions.table.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "transformer.ln_f.bias": bias("norm.bias", d)}
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for our_norm, their_norm in (("attn_norm", "ln_1"), ("ffn_norm", "ln_2")):
            out[theirs + f"{their_norm}.weight"] = state[ours + f"{our_norm}.weight"]
            out[theirs + f"{their_norm}.bias"] = bias(ours + f"{our_norm}.bias", d)
        # GPT-2's Conv1D stores [in, out]: the transpose of nn.Linear's [out, in]
        for our_linear, their_linear, width in (("attn.qkv", "attn.c_attn", 3 * d), ("attn.proj", "attn.c_proj", d),
                                                ("ffn.up", "mlp.c_fc", hidden), ("ffn.down", "mlp.c_proj", d)):
            out[theirs + f"{their_linear}.weight"] = state[ours + f"{our_linear}.weight"].t()
            out[theirs + f"{their_linear}.bias"] = bias(ours + f"{our_linear}.bias", width)
    return out


def to_hf_state_dict(model: nn.Module, config: TransformerConfig) -> dict[str, torch.Tensor]:
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out = _weight_map(hf_architecture(config))(config, state)
    if not config.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: TransformerConfig,
                       architecture: str) -> dict[str, torch.Tensor]:
    """The inverse of `to_hf_state_dict`: build our state dict from the exported tensors."""
    with torch.device("meta"):
        template = Transformer(config)
    ours = {k: torch.empty(v.shape, device="meta") for k, v in template.state_dict().items()}
    expected = _weight_map(architecture)(config, ours)
    if not config.tie_embeddings:
        expected["lm_head.weight"] = ours["head.weight"]
    missing = sorted(set(expected) - set(hf_state))
    if missing:
        raise ExportError(f"weights missing from the folder: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return {name: _gather(name, hf_state, config, architecture) for name in ours}


def _gather(name: str, hf: dict[str, torch.Tensor], config: TransformerConfig, architecture: str) -> torch.Tensor:
    if name == "head.weight":
        return hf["lm_head.weight"] if "lm_head.weight" in hf and not config.tie_embeddings else hf[_embed_name(architecture)]
    if architecture != "gpt2":  # Llama, Qwen2 and Qwen3
        table = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
        if name in table:
            return hf[table[name]]
        layer, rest = _split_block(name)
        theirs = f"model.layers.{layer}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            return torch.cat([hf[theirs + f"self_attn.{p}_proj.{kind}"] for p in "qkv"], dim=0)
        simple = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                  "attn.q_norm.weight": "self_attn.q_norm.weight", "attn.k_norm.weight": "self_attn.k_norm.weight"}
        if rest in simple:
            return hf[theirs + simple[rest]]
        module, kind = rest.rsplit(".", 1)
        their = {"attn.proj": "self_attn.o_proj", "ffn.gate": "mlp.gate_proj", "ffn.up": "mlp.up_proj",
                 "ffn.down": "mlp.down_proj"}[module]
        return hf[theirs + f"{their}.{kind}"]
    table = {"embed.weight": "transformer.wte.weight", "positions.table.weight": "transformer.wpe.weight",
             "norm.weight": "transformer.ln_f.weight", "norm.bias": "transformer.ln_f.bias"}
    if name in table:
        return hf[table[name]]
    layer, rest = _split_block(name)
    module, kind = rest.rsplit(".", 1)
    their = {"attn_norm": "ln_1", "ffn_norm": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}[module]
    tensor = hf[f"transformer.h.{layer}.{their}.{kind}"]
    return tensor.t() if kind == "weight" and "norm" not in module else tensor


def _embed_name(architecture: str) -> str:
    return "transformer.wte.weight" if architecture == "gpt2" else "model.embed_tokens.weight"


def _split_block(name: str) -> tuple[int, str]:
    _, layer, rest = name.split(".", 2)
    return int(layer), rest


# ----------------------------------------------------------------------------------------------
# Folders


def write_tokenizer_files(tokenizer_json: str, out_dir: str, model_max_length: int) -> None:
    """`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json` (raylm.data.tokenizer's)."""
    save_tokenizer(tokenizer_from_json(tokenizer_json), out_dir, model_max_length)


def export_hf(model: nn.Module, model_config: TransformerConfig | dict[str, Any], tokenizer_json: str | None,
              out_dir: str) -> str:
    """Write `out_dir` as a `transformers` model folder; return its path. Raises ExportError first,
    before writing anything, for a model that neither Llama, Qwen2, Qwen3 nor GPT-2 can express."""
    config = as_config(model_config)
    hf = hf_config(config, tokenizer_json)
    state = to_hf_state_dict(model, config)
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    weights = os.path.join(out_dir, "model.safetensors")
    save_file(state, weights, metadata={"format": "pt"})
    shutil.copymode(os.path.join(out_dir, "config.json"), weights)  # safetensors writes 0600; the folder is shared alike
    if tokenizer_json is not None:
        write_tokenizer_files(tokenizer_json, out_dir, config.seq_len)
    return out_dir


def _read_safetensors(folder: str) -> dict[str, torch.Tensor]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
    elif os.path.exists(os.path.join(folder, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors (raylm reads safetensors only, never pickles)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    return state


def import_hf(folder: str) -> tuple[nn.Module, TransformerConfig]:
    """A raylm decoder (eval mode, float32) and its config from a Llama, Qwen2, Qwen3 or GPT-2 model folder;
    ExportError naming the `config.json` key and value raylm does not compute."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{folder} has no config.json")
    with open(config_path) as handle:
        hf = json.load(handle)
    config = config_from_hf(hf)
    architecture = hf["model_type"]
    state = from_hf_state_dict({k: v.float() for k, v in _read_safetensors(folder).items()}, config, architecture)
    model = Transformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), config

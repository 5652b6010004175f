"""Parameter and FLOP counts computed from a model config, without building the model.

The trainer uses `flops_per_token` for MFU and `raylm plan` for sizing, so both share one formula:
6 FLOPs per matmul parameter per token (forward + backward) plus the attention score and value
products, 12 * layers * context * width (PaLM's convention, no causal halving). Embedding lookups
cost no FLOPs; the output head is a matmul and counts (tied or not). The tests check these counts
against the built modules for every preset and every component choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from raylm.model.config import TransformerConfig


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int  # token embedding, untied output head, learned position table

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _norm(config: TransformerConfig) -> int:
    return config.d_model * (2 if config.norm == "layernorm" and config.bias else 1)


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _qk_norms(config: TransformerConfig) -> int:
    return 2 * config.head_dim if config.qk_norm else 0


def _self_attention(config: TransformerConfig) -> int:
    d, kv = config.d_model, config.kv_heads * config.head_dim
    return _linear(d, d + 2 * kv, config.attention_qkv_bias) + _linear(d, d, config.bias) + _qk_norms(config)


def _cross_attention(config: TransformerConfig) -> int:
    d, kv = config.d_model, config.kv_heads * config.head_dim
    qkv_bias = config.attention_qkv_bias
    return _linear(d, d, qkv_bias) + _linear(d, 2 * kv, qkv_bias) + _linear(d, d, config.bias) + _qk_norms(config)


def _feed_forward(config: TransformerConfig) -> int:
    d, h = config.d_model, config.hidden
    inputs = 2 if config.activation == "swiglu" else 1
    return inputs * _linear(d, h, config.bias) + _linear(h, d, config.bias)


def block_parameters(config: TransformerConfig, cross_attention: bool = False) -> int:
    norms = 3 if cross_attention else 2
    return (_self_attention(config) + _feed_forward(config) + norms * _norm(config)
            + (_cross_attention(config) if cross_attention else 0))


def parameter_count(config: TransformerConfig) -> ParameterCount:
    d, vocab = config.d_model, config.vocab_size
    encoder_decoder = config.arch == "encoder-decoder"
    final_norms = (2 if encoder_decoder else 1) * _norm(config) if config.norm_position == "pre" else 0
    blocks = config.n_layers * block_parameters(config, cross_attention=encoder_decoder)
    if encoder_decoder:
        blocks += config.encoder_layers * block_parameters(config)
    embedding = vocab * d * (1 if config.tie_embeddings else 2)
    if config.position == "learned":
        embedding += config.seq_len * d
    return ParameterCount(total=blocks + final_norms + embedding, embedding=embedding)


def matmul_parameters(config: TransformerConfig) -> dict[str, int]:
    """Weights of the matmuls one token goes through, per part (biases and norms excluded)."""
    d, kv, h = config.d_model, config.kv_heads * config.head_dim, config.hidden
    attention = d * (d + 2 * kv) + d * d
    ffn = (3 if config.activation == "swiglu" else 2) * d * h
    return {"block": attention + ffn, "cross_q_out": 2 * d * d, "cross_kv": 2 * d * kv, "head": config.vocab_size * d}


def block_matrix_parameters(config: TransformerConfig) -> int:
    """The weights of the blocks' 2-D matrices (attention, cross-attention and feed-forward projections): what
    Muon steps, while AdamW takes the embeddings, the head, norms and biases."""
    m = matmul_parameters(config)
    if config.arch != "encoder-decoder":
        return config.n_layers * m["block"]
    return config.n_layers * (m["block"] + m["cross_q_out"] + m["cross_kv"]) + config.encoder_layers * m["block"]


def flops_per_token(config: TransformerConfig, seq_len: int | None = None) -> int:
    """Training FLOPs per token (forward and backward) at context `seq_len` (default: the model's).
    For the encoder-decoder, the FLOPs of one packed row (source through the encoder, continuation
    through the decoder) divided by its `seq_len` tokens."""
    d, context = config.d_model, seq_len or config.seq_len
    m = matmul_parameters(config)
    if config.arch != "encoder-decoder":
        return 6 * (config.n_layers * m["block"] + m["head"]) + 12 * config.n_layers * context * d
    source = max(1, min(context - 1, round(context * config.source_fraction)))
    target = context + 1 - source
    encoder = 6 * source * config.encoder_layers * m["block"] + 12 * config.encoder_layers * source * source * d
    decoder = (6 * target * config.n_layers * (m["block"] + m["cross_q_out"]) + 6 * source * config.n_layers * m["cross_kv"]
               + 6 * target * m["head"] + 12 * config.n_layers * target * (target + source) * d)
    return (encoder + decoder) // context


def activation_elements_per_token(config: TransformerConfig, checkpointing: bool = False) -> dict[str, int]:
    """Elements per token of a micro-batch held at the peak of a training step, by part.

    From what each op of a block saves for the backward pass (checked against
    `torch.autograd.graph.saved_tensors_hooks` on the built model): an RMSNorm keeps its input, the
    normalised tensor and its output (3 d; LayerNorm 2 d), attention the fused q/k/v output (3 d, k and
    v live on through views), the rotated q and k (2 d with RoPE), its output and the output
    projection's input (2 d); the SwiGLU feed-forward the gate, its activation, the up projection and
    their product (4 h; GELU / ReLU 2 h). The loss keeps the log-softmax (V); the peak comes at the
    start of the backward pass, when its gradient and the logits' gradient exist too (3 V, fp32).
    With activation checkpointing only each block's input (d) is kept; one block's tensors come back
    while it is recomputed, after the loss's tensors are gone (`recompute`: what that adds to the peak).
    """
    d, h = config.d_model, config.hidden
    norm = 3 * d if config.norm == "rmsnorm" else 2 * d
    attention = norm + 3 * d + (2 * d if config.position == "rope" else 0) + 2 * d
    feed_forward = norm + (4 * h if config.activation == "swiglu" else 2 * h)
    block = attention + feed_forward
    blocks = config.n_layers
    extra = 0
    if config.arch == "encoder-decoder":  # decoder blocks also hold a cross-attention (norm, q, k/v, out)
        blocks += config.encoder_layers
        extra = config.n_layers * (norm + 3 * d + 2 * d)
    loss = 3 * config.vocab_size
    if checkpointing:
        return {"blocks": blocks * d, "final_norm": norm, "loss": loss, "recompute": max(0, block - loss)}
    return {"blocks": blocks * block + extra, "final_norm": norm, "loss": loss, "recompute": 0}

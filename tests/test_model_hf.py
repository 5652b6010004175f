"""Hugging Face export and import: `transformers` loads the folder offline and computes our logits."""

from __future__ import annotations

import pytest
import torch

from raylm.model import TransformerConfig, build_model
from raylm.model.hf import ExportError, export_hf, import_hf

transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=300, d_model=48, n_layers=2, n_heads=4, seq_len=32)
VARIANTS = {
    "llama": LLAMA,
    "llama-gqa-untied-bias": dict(LLAMA, n_kv_heads=2, tie_embeddings=False, bias=True, rope_theta=500.0),
    "gpt2": dict(LLAMA, position="learned", norm="layernorm", activation="gelu", bias=True),
    "gpt2-nobias-relu-untied": dict(LLAMA, position="learned", norm="layernorm", activation="relu",
                                    tie_embeddings=False),
}


def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer=trainer)
    return tokenizer.to_str()


def randomised(config: TransformerConfig):
    torch.manual_seed(0)
    model = build_model(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping cannot hide behind ones and zeros
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_transformers_logits_match_and_import_round_trips(variant, tmp_path):
    config = TransformerConfig(**VARIANTS[variant])
    model = randomised(config)
    folder = export_hf(model, config, tokenizer_json(), str(tmp_path / "hf"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    expected = "LlamaForCausalLM" if variant.startswith("llama") else "GPT2LMHeadModel"
    assert type(hf_model).__name__ == expected
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens).logits
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
        imported, imported_config = import_hf(folder)
        assert torch.allclose(imported(tokens), ours, atol=1e-5)
    for key in ("d_model", "n_layers", "n_heads", "kv_heads", "hidden", "position", "norm", "activation",
                "tie_embeddings", "seq_len", "rope_theta"):
        assert getattr(imported_config, key) == getattr(config, key), key
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.decode(tokenizer("return x")["input_ids"]) == "return x"
    assert tokenizer.pad_token == "<|pad|>" and hf_model.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("overrides, reason", [
    (dict(position="sinusoidal"), "position/norm/activation"),
    (dict(norm_position="post"), "pre-norm"),
    (dict(position="rope", norm="layernorm"), "position/norm/activation"),
    (dict(position="learned", norm="layernorm", activation="gelu", n_kv_heads=2), "grouped-query"),
    (dict(arch="encoder-decoder"), "only decoder models"),
])
def test_refuses_what_neither_architecture_expresses(overrides, reason, tmp_path):
    config = TransformerConfig(**{**LLAMA, **overrides})
    with pytest.raises(ExportError, match=reason):
        export_hf(torch.nn.Linear(1, 1), config, None, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()

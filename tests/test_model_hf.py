"""Hugging Face export and import: `transformers` loads the folder offline and computes our logits."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from raylm.model import Transformer, TransformerConfig, build_model
from raylm.model.hf import ExportError, export_hf, import_hf
from raylm.model.sizing import parameter_count

transformers = pytest.importorskip("transformers")

LLAMA = dict(vocab_size=300, d_model=48, n_layers=2, n_heads=4, seq_len=32)
VARIANTS = {
    "llama": LLAMA,
    "llama-gqa-untied-bias": dict(LLAMA, n_kv_heads=2, tie_embeddings=False, bias=True, rope_theta=500.0),
    "llama-rope-scaled": dict(LLAMA, rope_theta=500000.0, rope_scaling=dict(factor=8.0, original_max_position_embeddings=16)),
    "qwen2-gqa": dict(LLAMA, n_kv_heads=2, qkv_bias=True, rope_theta=1e6),
    "qwen3-qknorm-untied": dict(LLAMA, n_kv_heads=2, qk_norm=True, tie_embeddings=False),
    "gpt2": dict(LLAMA, position="learned", norm="layernorm", activation="gelu", bias=True),
    "gpt2-gelu-tanh": dict(LLAMA, position="learned", norm="layernorm", activation="gelu_tanh", bias=True),
    "gpt2-nobias-relu-untied": dict(LLAMA, position="learned", norm="layernorm", activation="relu",
                                    tie_embeddings=False),
}
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gpt2": "GPT2LMHeadModel"}


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
    assert type(hf_model).__name__ == HF_CLASSES[variant.split("-")[0]]
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_len))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf_model(tokens).logits
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
        imported, imported_config = import_hf(folder)
        assert torch.allclose(imported(tokens), ours, atol=1e-5)
    for key in ("d_model", "n_layers", "n_heads", "kv_heads", "hidden", "position", "norm", "activation",
                "tie_embeddings", "seq_len", "rope_theta", "rope_scaling", "qkv_bias", "qk_norm"):
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
    (dict(logit_softcap=15.0), r"model.logit_softcap = 15.0: Llama, Qwen2/3 and GPT-2 do not cap"),
    (dict(activation="relu2"), r"model.activation = 'relu2': no exported architecture"),
    (dict(qk_norm=True, bias=True), r"model.qk_norm = true: only Qwen3"),
    (dict(qk_norm=True, position="learned", norm="layernorm", activation="gelu"), r"model.qk_norm = true: only Qwen3"),
])
def test_refuses_what_neither_architecture_expresses(overrides, reason, tmp_path):
    config = TransformerConfig(**{**LLAMA, **overrides})
    with pytest.raises(ExportError, match=reason):
        export_hf(torch.nn.Linear(1, 1), config, None, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Base models as Hugging Face publishes them: built and saved by `transformers` (random weights), imported
# into raylm with the same logits, exported back and loaded by `transformers` with the same logits again.

TOLERANCE = 1e-5  # float32; measured: 0.0 for Llama 3 scaling and Qwen2, <= 2e-7 for GPT-2's gelu_new
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)


def _published_rope_layout(config: dict) -> None:
    """The layout of the published Llama 3.2 config.json (transformers 4.x): `rope_theta` beside `rope_scaling`."""
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope


PUBLISHED = {  # name: (config class, config kwargs, edit of the saved config.json, positions fed)
    "gpt2-gelu_new": ("GPT2Config", dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                         activation_function="gelu_new"), None, 64),
    "gpt2-gelu_pytorch_tanh-untied": ("GPT2Config", dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                         activation_function="gelu_pytorch_tanh",
                                                         tie_word_embeddings=False), None, 64),
    # original_max_position_embeddings 64 << 512 positions: the scaling changes most of the frequencies
    "llama3-rope-scaling-gqa": ("LlamaConfig", dict(SMALL, num_key_value_heads=2, max_position_embeddings=512,
                                                    rope_theta=500000.0, rope_scaling=LLAMA3_SCALING), None, 200),
    "llama3-rope-scaling-published-layout": ("LlamaConfig", dict(SMALL, max_position_embeddings=512, rope_theta=500000.0,
                                                                 rope_scaling=LLAMA3_SCALING, tie_word_embeddings=True),
                                             _published_rope_layout, 200),
    "qwen2-gqa-tied": ("Qwen2Config", dict(SMALL, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
                                           tie_word_embeddings=True), None, 100),
}
IMPORTED_AS = {"gpt2-gelu_new": dict(activation="gelu_tanh", position="learned"),
               "gpt2-gelu_pytorch_tanh-untied": dict(activation="gelu_tanh", tie_embeddings=False),
               "llama3-rope-scaling-gqa": dict(n_kv_heads=2, rope_theta=500000.0, qkv_bias=False),
               "llama3-rope-scaling-published-layout": dict(rope_theta=500000.0),
               "qwen2-gqa-tied": dict(n_kv_heads=2, qkv_bias=True, bias=False, rope_theta=1e6, tie_embeddings=True)}


def published_folder(name: str, folder) -> tuple[str, torch.nn.Module]:
    """A random-weight `transformers` model saved with save_pretrained (norms and biases randomised too)."""
    import json

    config_class, kwargs, edit, _ = PUBLISHED[name]
    torch.manual_seed(0)
    hf_model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_class)(**kwargs)).eval()
    with torch.no_grad():
        for param in hf_model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    hf_model.save_pretrained(folder)
    if edit:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return str(folder), hf_model


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_base_models_import_and_export_with_equal_logits(name, tmp_path):
    folder, hf_model = published_folder(name, tmp_path / "published")
    tokens = torch.randint(0, 300, (2, PUBLISHED[name][3]), generator=torch.Generator().manual_seed(1))
    model, config = import_hf(folder)
    for key, value in IMPORTED_AS[name].items():
        assert getattr(config, key) == value, key
    with torch.no_grad():
        theirs = hf_model(tokens).logits
        diff = (model(tokens) - theirs).abs().max().item()
        assert diff < TOLERANCE, f"{name}: import max abs diff {diff}"
        exported = export_hf(model, config, tokenizer_json(), str(tmp_path / "exported"))
        again = transformers.AutoModelForCausalLM.from_pretrained(exported, local_files_only=True).eval()
        assert type(again) is type(hf_model)
        diff = (again(tokens).logits - theirs).abs().max().item()
        assert diff < TOLERANCE, f"{name}: export max abs diff {diff}"
    if name.startswith("llama3"):
        assert config.rope_scaling.factor == 8.0 and config.rope_scaling.original_max_position_embeddings == 64
        assert again.config.rope_parameters["rope_type"] == "llama3"
        unscaled = Transformer(replace(config, rope_scaling=None)).eval()
        unscaled.load_state_dict(model.state_dict())
        with torch.no_grad():  # the scaling matters at these positions: leaving it out fails the tolerance
            assert (unscaled(tokens) - theirs).abs().max().item() > 100 * TOLERANCE
    if name.startswith("gpt2"):
        assert again.config.activation_function == "gelu_pytorch_tanh"


def test_llama3_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from raylm.model.config import RopeScaling
    from raylm.model.layers import llama3_scaled_frequencies

    hf = transformers.LlamaConfig(**SMALL, max_position_embeddings=131072, rope_theta=500000.0,
                                  rope_scaling=dict(LLAMA3_SCALING, factor=32.0, original_max_position_embeddings=8192))
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    head_dim = 16
    plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ours = llama3_scaled_frequencies(plain, RopeScaling(factor=32.0, original_max_position_embeddings=8192))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, plain)  # low frequencies are stretched at every position


def _edited(model_type: str, **changes) -> dict:
    base = {"llama": dict(model_type="llama", vocab_size=300, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128, max_position_embeddings=512),
            "gpt2": dict(model_type="gpt2", vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64)}
    config = dict(base.get(model_type, base["llama"]), model_type=model_type)
    config.update(changes)
    return config


@pytest.mark.parametrize("hf, message", [
    (_edited("llama", rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)),
     "rope_parameters.rope_type = 'yarn'"),
    (_edited("llama", rope_theta=1e4, rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling.rope_type = 'linear'"),
    (_edited("llama", rope_scaling=dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0)),
     "rope_scaling of rope_type 'llama3' lacks 'factor'"),
    (_edited("llama", rope_scaling=dict(LLAMA3_SCALING, high_freq_factor=0.5)), "rope_scaling.high_freq_factor = 0.5"),
    (_edited("llama", rope_scaling=dict(LLAMA3_SCALING, factor=-2)), "rope_scaling.factor = -2"),
    (_edited("llama", partial_rotary_factor=0.5), "partial_rotary_factor = 0.5"),
    (_edited("llama", rope_parameters=dict(full_attention=dict(rope_type="default", rope_theta=1e4))),
     "rope_parameters has one RoPE per layer type (full_attention)"),
    (_edited("llama", attention_bias=True), "attention_bias = True differs from mlp_bias = False"),
    (_edited("gpt2", activation_function="silu"), "activation_function = 'silu'"),
    (_edited("gpt2", activation_function="quick_gelu"), "activation_function = 'quick_gelu'"),
    (_edited("gpt2", scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx = True"),
    (_edited("gpt2", scale_attn_weights=False), "scale_attn_weights = False"),
    (_edited("qwen2", use_sliding_window=True, sliding_window=16), "use_sliding_window = True"),
    (_edited("qwen2", layer_types=["full_attention", "sliding_attention"]), "layer_types has 'sliding_attention'"),
    (_edited("qwen2", hidden_act="gelu"), "hidden_act = 'gelu'"),
    (_edited("qwen3", attention_bias=True), "attention_bias = True: raylm's qk_norm layout (Qwen3) has no attention"),
    (_edited("mistral"), "model_type = 'mistral': raylm imports 'llama', 'qwen2', 'qwen3' and 'gpt2'"),
])
def test_unsupported_hf_values_are_refused_naming_key_and_value(hf, message):
    from raylm.model.hf import config_from_hf

    with pytest.raises(ExportError, match=re.escape(message)):
        config_from_hf(hf)


def test_import_refuses_a_saved_qwen2_with_its_sliding_window_on(tmp_path):
    config = transformers.Qwen2Config(**SMALL, num_key_value_heads=4, max_position_embeddings=64,
                                      use_sliding_window=True, sliding_window=8, max_window_layers=1)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"config\.json use_sliding_window = True: raylm attends over the whole"):
        import_hf(str(tmp_path))


def test_new_model_keys_are_hash_neutral_and_old_model_configs_load():
    config = TransformerConfig(**LLAMA)
    assert "qkv_bias" not in config.section() and "rope_scaling" not in config.section()
    older = {key: value for key, value in config.to_dict().items() if key not in ("qkv_bias", "rope_scaling")}
    assert TransformerConfig.from_dict(older) == config  # a model_config.json written before these keys
    scaled = TransformerConfig(**LLAMA, qkv_bias=True, rope_scaling=dict(factor=32.0))
    assert scaled.section()["qkv_bias"] is True and scaled.section()["rope_scaling"]["factor"] == 32.0
    assert TransformerConfig.from_dict(json.loads(json.dumps(scaled.to_dict()))) == scaled
    with torch.device("meta"):
        assert parameter_count(scaled).total == sum(p.numel() for p in build_model(scaled).parameters())
    with pytest.raises(ValueError, match=r"model\.rope_scaling\.rope_type = 'yarn': expected one of llama3"):
        TransformerConfig(**LLAMA, rope_scaling=dict(rope_type="yarn"))
    with pytest.raises(ValueError, match=r"model\.rope_scaling needs model\.position = 'rope', got 'learned'"):
        TransformerConfig(**LLAMA, position="learned", rope_scaling={})


def test_an_imported_gpt2_generates_and_scores_as_transformers_does(tmp_path):
    from lm_eval.api.instance import Instance

    from raylm.eval.lm import RaylmLM
    from raylm.model.generate import generate

    folder, hf_model = published_folder("gpt2-gelu_new", tmp_path / "gpt2")
    model, _ = import_hf(folder)
    prompt = [5, 17, 42, 99, 7]
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=299,
                                     pad_token_id=0)[0, len(prompt):].tolist()
    for use_cache in (True, False):
        assert generate(model, [prompt], 12, eos_id=299, use_cache=use_cache) == [expected]

    lm = RaylmLM(model=model, tokenizer_json=tokenizer_json(), batch_size=2)
    assert lm.shared_context  # the imported model takes the shared-context scoring path
    pairs = [("def f(x):\n", "    return x + 1"), ("def f(x):\n", "    return x")]
    scores = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (score, _) in zip(pairs, scores):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        tokens = torch.tensor([context_ids + continuation_ids])
        with torch.no_grad():
            logprobs = hf_model(tokens[:, :-1]).logits.log_softmax(-1)[0, len(context_ids) - 1:]
        assert score == pytest.approx(float(logprobs.gather(-1, tokens[0, len(context_ids):, None]).sum()), abs=1e-4)

"""The model family: every component choice, both architectures, masks, the KV cache, gradient
checkpointing, torch.compile, presets and the sizing formulas."""

from __future__ import annotations

import pytest
import torch

from raylm.model import PRESETS, TransformerConfig, build_model, preset
from raylm.model.generate import generate, generate_tokens, left_pad, sample_next
from raylm.model.loss import lm_batch, summed_loss
from raylm.model.sizing import flops_per_token, parameter_count

pytestmark = pytest.mark.usefixtures("one_torch_thread")


BASE = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, seq_len=24)
VARIANTS = {
    "modern": {},
    "guide": dict(position="sinusoidal", activation="relu", norm="layernorm", norm_position="post", bias=True),
    "gpt2": dict(position="learned", activation="gelu", norm="layernorm", bias=True, tie_embeddings=False),
    "gqa": dict(n_kv_heads=2, ffn_hidden=48),
    "recipe": dict(qk_norm=True, logit_softcap=15.0, activation="relu2", tie_embeddings=False),
}
ARCHS = ["decoder", "encoder-decoder"]


def make(arch: str = "decoder", variant: str = "modern", **overrides):
    torch.manual_seed(0)
    config = TransformerConfig(**{**BASE, **VARIANTS[variant], "arch": arch, **overrides})
    return build_model(config).eval(), config


def run(model, tokens, source):
    if model.config.arch == "encoder-decoder":
        return model(source, tokens)
    return model(tokens)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_causality(arch, variant):
    model, config = make(arch, variant)
    tokens = torch.randint(0, 61, (2, 16))
    source = torch.randint(0, 61, (2, 10))
    changed = tokens.clone()
    changed[:, 9:] = (tokens[:, 9:] + 1) % 61
    with torch.no_grad():
        before, after = run(model, tokens, source=source), run(model, changed, source=source)
    assert torch.allclose(before[:, :9], after[:, :9], atol=1e-5)
    assert not torch.allclose(before[:, 9:], after[:, 9:], atol=1e-3)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_left_padded_batch_equals_each_sequence_alone(variant):
    model, _ = make("decoder", variant)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [3]]
    tokens, mask = left_pad(prompts, pad_id=0)
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            alone = model(torch.tensor([prompt]))
            assert torch.allclose(batched[row, -len(prompt):], alone[0], atol=1e-5)


def test_encoder_padding_and_source_influence_only_through_cross_attention():
    model, _ = make("encoder-decoder", "guide")
    sources = [[5, 6, 7, 8, 9], [12, 13]]
    source, source_mask = left_pad(sources, pad_id=0)
    tokens = torch.randint(0, 61, (2, 6))
    with torch.no_grad():
        batched = model(source, tokens, source_mask=source_mask)
        for row, src in enumerate(sources):
            assert torch.allclose(batched[row], model(torch.tensor([src]), tokens[row:row + 1])[0], atol=1e-5)
        other = model(torch.randint(0, 61, (2, 5)), tokens)
        assert (model(source, tokens) - other).abs().max() > 1e-6  # small at init, but there
        # With every cross-attention branch removed, the source has no path to the output.
        for block in model.blocks:
            block.cross.forward = lambda *args, **kwargs: torch.zeros_like(args[0])
        assert torch.equal(model(source, tokens), model(torch.randint(0, 61, (2, 5)), tokens))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", ["modern", "guide", "gqa"])
def test_kv_cache_generation_equals_recomputation(arch, variant):
    model, _ = make(arch, variant)
    prompts = [[5, 6, 7, 8, 9], [12, 13], [40, 41, 42]]
    cached = generate(model, prompts, max_new_tokens=12, use_cache=True)
    recomputed = generate(model, prompts, max_new_tokens=12, use_cache=False)
    assert cached == recomputed
    assert all(len(out) == 12 for out in cached)
    if arch == "decoder":  # batching with left padding does not change a prompt's continuation
        assert generate(model, [prompts[1]], max_new_tokens=12) == [cached[1]]


def test_stop_sequences_eos_and_context_limit():
    model, _ = make()
    prompt = [[5, 6, 7]]
    free = generate(model, prompt, max_new_tokens=10)[0]
    stop = free[3:5]
    first = next(i for i in range(len(free) - 1) if free[i:i + 2] == stop)
    assert generate(model, prompt, max_new_tokens=10, stop_sequences=[stop])[0] == free[:first]
    assert generate(model, prompt, max_new_tokens=10, eos_id=free[0])[0] == []
    assert len(generate(model, prompt, max_new_tokens=100)[0]) == BASE["seq_len"] - 3
    assert generate(model, [list(range(1, 25)), [3]], max_new_tokens=[5, 30]) == [[], free_of([3], model)[:23]]
    with pytest.raises(ValueError, match="longer than the model's seq_len"):
        generate(model, [list(range(1, 26))], max_new_tokens=1)


def free_of(prompt, model):
    return generate(model, [prompt], max_new_tokens=100)[0]


def test_generate_tokens_for_harnesses_keeps_the_stopping_tokens():
    model, _ = make()
    free = generate(model, [[5, 6, 7], [9]], max_new_tokens=8)
    stop = [lambda ids: len(ids) >= 3, lambda ids: False]
    assert generate_tokens(model, [[5, 6, 7], [9]], [8, 5], stop=stop) == [free[0][:3], free[1][:5]]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 4.9]])
    generator = torch.Generator().manual_seed(0)
    assert sample_next(logits).item() == 2
    top_k = {sample_next(logits, 1.0, top_k=2, generator=generator).item() for _ in range(200)}
    assert top_k == {2, 3}
    nucleus = {sample_next(logits, 1.0, top_p=0.4, generator=generator).item() for _ in range(200)}
    assert nucleus == {2}
    hot = {sample_next(logits, 100.0, generator=generator).item() for _ in range(400)}
    assert hot == {0, 1, 2, 3}


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    rows = torch.randint(0, 61, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model, config = make(arch, "gpt2", activation_checkpointing=checkpointing)
        model.train()
        inputs, targets = lm_batch(rows, config)
        loss, count = summed_loss(model(**inputs), targets, pad_id=-1)
        (loss / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


@pytest.mark.parametrize("arch", ARCHS)
def test_torch_compile_forward_and_backward(arch):
    model, config = make(arch, "modern", activation_checkpointing=True, n_layers=1)
    model.train()
    inputs, targets = lm_batch(torch.randint(0, 61, (2, 17)), config)
    eager = model(**inputs)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(**inputs)
    assert torch.allclose(out, eager, atol=1e-5)
    loss, count = summed_loss(out, targets, pad_id=-1)
    (loss / count).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_seq2seq_batch_predicts_the_continuation():
    config = TransformerConfig(**{**BASE, "arch": "encoder-decoder", "seq_len": 8})
    rows = torch.arange(9)[None]
    inputs, targets = lm_batch(rows, config)
    assert inputs["source"].tolist() == [[0, 1, 2, 3]]
    assert inputs["tokens"].tolist() == [[3, 4, 5, 6, 7]]
    assert targets.tolist() == [[4, 5, 6, 7, 8]]
    loss_mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 1, 1]])
    assert lm_batch(rows, config, loss_mask, ignore_id=-1)[1].tolist() == [[4, -1, -1, 7, 8]]
    decoder = TransformerConfig(**{**BASE, "seq_len": 8})
    inputs, targets = lm_batch(rows, decoder, loss_mask, ignore_id=-1)
    assert inputs["tokens"].tolist() == [list(range(8))] and targets.tolist() == [[1, 2, 3, 4, -1, -1, 7, 8]]


def test_encoder_decoder_learns_a_batch():  # (the decoder's twin is in test_model_basics.py)
    model, config = make("encoder-decoder", "modern")
    model.train()
    rows = torch.randint(0, 61, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    losses = []
    for _ in range(30):
        inputs, targets = lm_batch(rows, config)
        loss, count = summed_loss(model(**inputs), targets, pad_id=-1)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss / count))
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_formula_equals_the_module_for_every_preset(name, arch):
    config = preset(name, arch=arch)
    with torch.device("meta"):
        model = build_model(config)
    assert parameter_count(config).total == sum(p.numel() for p in model.parameters())
    matmuls = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    if arch == "decoder":
        assert flops_per_token(config) == 6 * matmuls + 12 * config.n_layers * config.seq_len * config.d_model
    else:
        assert 6 * matmuls * 0.4 < flops_per_token(config) < 6 * matmuls * 1.5 + 24 * 2 * config.n_layers * config.seq_len * config.d_model


def test_gpt2_preset_is_gpt2_small():
    assert parameter_count(preset("gpt2-124m")).total == 124_439_808


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_formula_for_every_component_choice(variant):
    for arch in ARCHS:
        model, config = make(arch, variant)
        assert parameter_count(config).total == model.num_parameters()


def test_bad_component_names_say_what_is_allowed():
    with pytest.raises(ValueError, match="model.position = 'alibi': expected one of rope, learned, sinusoidal"):
        TransformerConfig(vocab_size=10, position="alibi")
    with pytest.raises(ValueError, match="model.n_kv_heads = 3: must divide model.n_heads = 4"):
        TransformerConfig(vocab_size=10, n_kv_heads=3)
    with pytest.raises(ValueError, match="model.preset = 'huge'"):
        preset("huge")

"""Fine-tuning methods on a real (tiny) Transformer: frozen layers stay bitwise, LoRA trains only adapters and
merges exactly; base resolution, architecture checks and checkpoints written without a process group."""

from __future__ import annotations

import os

import pytest
import torch

from raylm.config import ConfigError, FinetuneConfig, validate_config
from raylm.finetune import FinetuneError, merge_lora, prepare_for_finetune
from raylm.model import Transformer, TransformerConfig
from raylm.train.checkpoint import load_model
from raylm.finetune.stage import (check_architecture, count_parameters, finetune_spec, load_finetuned,
                                  resolve_base, write_plain_checkpoint)
from raylm.workspace import Workspace

CONFIG = TransformerConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, seq_len=16)


def spec(**settings) -> dict:
    return finetune_spec(FinetuneConfig(**settings))


def train_steps(model: torch.nn.Module, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.seq_len + 1), generator=generator)
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, CONFIG.vocab_size), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize("frozen, frozen_prefixes", [
    ({"first_blocks": 2}, ("embed.", "head.", "blocks.0.", "blocks.1.")),
    ({"last_blocks": 1}, ("embed.", "blocks.0.", "blocks.1.")),
])
def test_frozen_parameters_are_bitwise_unchanged(frozen, frozen_prefixes):
    torch.manual_seed(0)
    config = CONFIG if "first_blocks" in frozen else TransformerConfig(**{**CONFIG.to_dict(), "tie_embeddings": False})
    model = prepare_for_finetune(Transformer(config), spec(method="frozen", frozen=frozen))
    before = snapshot(model)
    train_steps(model)
    after = snapshot(model)
    for name in before:
        unchanged = torch.equal(before[name], after[name])
        if name.startswith(frozen_prefixes):
            assert unchanged, f"frozen {name} changed"
        else:
            assert not unchanged, f"trainable {name} did not change"


def test_frozen_block_count_beyond_the_model_names_the_key():
    with pytest.raises(FinetuneError, match=r"finetune.frozen.first_blocks = 5: the model has only 3 blocks"):
        prepare_for_finetune(Transformer(CONFIG), spec(method="frozen", frozen={"first_blocks": 5}))


def test_frozen_method_needs_exactly_one_setting():
    with pytest.raises(ConfigError, match=r"finetune.frozen.first_blocks or finetune.frozen.last_blocks"):
        validate_config({"finetune": {"method": "frozen"}})


def test_lora_trains_only_adapters_and_merges_to_the_same_logits():
    torch.manual_seed(0)
    model = prepare_for_finetune(Transformer(CONFIG), spec(method="lora", lora={"rank": 4, "alpha": 8}))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = snapshot(model)
    train_steps(model)
    after = snapshot(model)
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == ("lora_" in name), name

    tokens = torch.randint(0, CONFIG.vocab_size, (2, CONFIG.seq_len))
    model.eval()
    with torch.no_grad():
        adapted = model(tokens)
        merged = merge_lora(model)
        assert type(merged) is Transformer
        assert not any("lora" in name for name in merged.state_dict())
        assert torch.allclose(merged(tokens), adapted, atol=1e-5, rtol=0)


def test_lora_unknown_target_module_is_named():
    with pytest.raises(FinetuneError, match=r"no Linear module named \['attention'\]"):
        prepare_for_finetune(Transformer(CONFIG), spec(method="lora", lora={"target_modules": ["attention"]}))


def test_parameter_counts_per_method():
    full = count_parameters(CONFIG.to_dict(), spec(method="full"))
    frozen = count_parameters(CONFIG.to_dict(), spec(method="frozen", frozen={"first_blocks": 3}))
    lora = count_parameters(CONFIG.to_dict(), spec(method="lora", lora={"rank": 2, "target_modules": ["qkv"]}))
    assert full["params_trainable"] == full["params_total"] == Transformer(CONFIG).num_parameters()
    assert frozen["params_trainable"] == 32  # only the final norm (the head is tied to the frozen embedding)
    assert lora["params_trainable"] == 3 * 2 * (32 + 3 * 32)
    assert lora["params_total"] == full["params_total"] + lora["params_trainable"]


def test_plain_checkpoint_round_trip_and_lora_checkpoint_merges(tmp_path):
    torch.manual_seed(0)
    base = Transformer(CONFIG)
    directory = write_plain_checkpoint(str(tmp_path / "base"), base, CONFIG.to_dict(), '{"tok": 1}', {"step": 0})
    loaded = load_model(directory)
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), loaded.state_dict().values()))

    lora_spec = spec(method="lora", lora={"rank": 2})
    adapted = prepare_for_finetune(Transformer(CONFIG), lora_spec)
    train_steps(adapted, 1)
    adapter_dir = write_plain_checkpoint(str(tmp_path / "adapted"), adapted, CONFIG.to_dict(), None, {"step": 1})
    merged = load_finetuned(adapter_dir, lora_spec)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 8))
    adapted.eval()
    with torch.no_grad():
        assert torch.allclose(merged(tokens), adapted(tokens), atol=1e-5, rtol=0)


def test_resolve_base_and_architecture_mismatch_names_the_key(tmp_path):
    directory = write_plain_checkpoint(str(tmp_path / "ckpt"), Transformer(CONFIG), CONFIG.to_dict(), "{}", {"step": 0})
    base = resolve_base(directory, Workspace(str(tmp_path / "ws")))
    assert base.kind == "checkpoint" and base.model_config["d_model"] == 32

    model = check_architecture(TransformerConfig(), base)  # nothing set explicitly: the base's architecture
    assert (model.d_model, model.n_layers, model.seq_len) == (32, 3, 16)
    with pytest.raises(ConfigError, match=r"model.d_model = 64 but the base checkpoint .* has d_model = 32"):
        check_architecture(TransformerConfig(d_model=64, n_heads=2), base)
    assert check_architecture(TransformerConfig(dropout=0.1, n_layers=3), base).dropout == 0.1

    with pytest.raises(ValueError, match=r"--from .*: folder is neither"):
        resolve_base(str(tmp_path), Workspace(str(tmp_path / "ws")))
    with pytest.raises(ValueError, match=r"not a directory or an MLflow run id"):
        resolve_base(os.path.join(tmp_path, "missing"), Workspace(str(tmp_path / "ws")))


def test_lora_and_frozen_on_the_encoder_decoder():
    from raylm.model import build_model

    config = TransformerConfig(**{**CONFIG.to_dict(), "arch": "encoder-decoder", "n_layers": 2})
    torch.manual_seed(0)
    model = prepare_for_finetune(build_model(config), spec(method="lora", lora={"rank": 2}))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    targets = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.named_parameters() if "lora_A" in name}
    assert targets >= {"proj", "up", "down"}
    source, tokens = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    model.eval()
    with torch.no_grad():
        adapted = model(source, tokens)
        assert torch.allclose(merge_lora(model)(source, tokens), adapted, atol=1e-5, rtol=0)

    frozen = prepare_for_finetune(build_model(config), spec(method="frozen", frozen={"first_blocks": 1}))
    trainable = {name for name, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and not any(name.startswith(("encoder.", "embed.", "blocks.0.")) for name in trainable)

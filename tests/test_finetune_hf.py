"""`raylm finetune --from HF_FOLDER`: a Hugging Face model folder (the model issue's export format, which
`transformers` loads) is imported into raylm's model and fine-tuned with the folder's own tokenizer through
the real path (Ray Train, MLflow); folders raylm cannot import are refused, naming the path, before Ray
starts or the workspace is touched."""

from __future__ import annotations

import json
import math
import shutil

import mlflow
import pytest
import torch

from raylm.config import TokenizerConfig
from raylm.data.chat import TEMPLATE_TOKENS
from raylm.data.tokenizer import train_tokenizer
from raylm.model import Transformer, TransformerConfig
from raylm.model.hf import export_hf
from raylm.train.checkpoint import load_model, load_tokenizer_json
from raylm.finetune.stage import BaseModelError, resolve_base
from raylm.workspace import Workspace
from tests.test_finetune_run import chat_rows, make_config, write_chat

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> str:
    """A random-init raylm model (Llama architecture) exported with its chat-ready tokenizer."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    texts = [json.dumps(row) for row in chat_rows(200, seed=1)]
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=320, min_frequency=1,
                                                       special_tokens=list(TEMPLATE_TOKENS.values())))
    config = TransformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=64, n_layers=2, n_heads=2, seq_len=64)
    torch.manual_seed(0)
    return export_hf(Transformer(config), config, tokenizer.to_str(), str(folder))


def broken_copy(source: str, target, config_edit=None, drop: tuple[str, ...] = ()) -> str:
    shutil.copytree(source, target)
    for name in drop:
        (target / name).unlink()
    if config_edit:
        config = json.loads((target / "config.json").read_text())
        config_edit(config)
        (target / "config.json").write_text(json.dumps(config))
    return str(target)


def _bert(config: dict) -> None:
    config.update(model_type="bert", architectures=["BertForMaskedLM"])


def _three_layers(config: dict) -> None:
    config["num_hidden_layers"] = 3


@pytest.mark.parametrize("edit, drop, reason", [
    (_bert, (), r"model_type = 'bert': raylm imports 'llama', 'qwen2', 'qwen3' and 'gpt2'"),
    (_three_layers, (), r"weights missing from the folder: model\.layers\.2\."),
    (None, ("model.safetensors",), r"no model\.safetensors"),
    (None, ("tokenizer.json",), r"no tokenizer\.json"),
    (lambda config: config.pop("hidden_size"), (), r"lacks or mangles 'hidden_size'"),
])
def test_unusable_hf_folders_are_refused_naming_the_path(hf_folder, tmp_path, edit, drop, reason):
    folder = broken_copy(hf_folder, tmp_path / "broken", edit, drop)
    workspace = tmp_path / "workspace"
    with pytest.raises(BaseModelError, match=rf"--from {folder}: not a Hugging Face model folder .*{reason}"):
        resolve_base(folder, Workspace(str(workspace)))
    assert not list(workspace.rglob("manifest.json")) and not list(workspace.rglob("checkpoint"))  # no stage ran


def test_cli_refuses_an_unsupported_architecture_before_ray_or_the_workspace(hf_folder, tmp_path, capsys):
    import ray

    from raylm.cli import main

    ray_was_running = ray.is_initialized()
    folder = broken_copy(hf_folder, tmp_path / "bert", _bert)
    chat = write_chat(tmp_path, chat_rows(10, seed=7))
    workspace = tmp_path / "workspace"
    code = main(["finetune", "--from", folder, "--config", "configs/tiny.yaml", "--workspace", str(workspace),
                 "--set", f"finetune.data={chat}"])
    assert code == 2
    error = capsys.readouterr().err
    assert f"--from {folder}" in error and "model_type = 'bert'" in error
    assert not workspace.exists() and ray.is_initialized() == ray_was_running


@pytest.mark.slow
def test_finetune_starts_from_a_hugging_face_folder(ray_light, tmp_path, hf_folder):
    from raylm.pipeline import Pipeline

    assert transformers.AutoModelForCausalLM.from_pretrained(hf_folder).config.model_type == "llama"
    config = make_config(tmp_path, write_chat(tmp_path, chat_rows(160, seed=2)), "full", max_steps=20)
    manifest = Pipeline(config).finetune(hf_folder)

    figures = manifest.metrics
    assert math.isfinite(figures["val_loss_before"]) and math.isfinite(figures["val_loss_after"])
    assert figures["val_loss_after"] < figures["val_loss_before"], figures
    assert manifest.base["kind"] == "hf" and manifest.base["source"] == hf_folder

    run = mlflow.get_run(manifest.record.mlflow_run_id)
    assert run.data.tags["raylm.base.kind"] == "hf" and run.data.tags["raylm.base.source"] == hf_folder
    assert run.data.metrics["val/loss_after"] == pytest.approx(figures["val_loss_after"])
    assert run.data.metrics["val/loss_before"] == pytest.approx(figures["val_loss_before"])
    # the imported base carries the folder's tokenizer, which the chat data was tokenized with
    with open(f"{hf_folder}/tokenizer.json") as handle:
        assert load_tokenizer_json(run.data.tags["raylm.base.checkpoint"]) == handle.read()
    base = load_model(run.data.tags["raylm.base.checkpoint"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    tokens = torch.randint(0, base.config.vocab_size, (1, 16))
    with torch.no_grad():  # the import is the folder's model: same logits
        assert torch.allclose(base.eval()(tokens), hf(tokens).logits, atol=1e-4)
    tuned = load_model(manifest.checkpoint)
    assert type(tuned) is Transformer and tuned.config.n_layers == 2


def test_a_gpt2_folder_resolves_to_an_imported_base_with_the_folders_tokenizer(hf_folder, tmp_path):
    with open(f"{hf_folder}/tokenizer.json") as handle:
        tokenizer = handle.read()
    from tokenizers import Tokenizer

    config = TransformerConfig(vocab_size=Tokenizer.from_str(tokenizer).get_vocab_size(), d_model=32, n_layers=2,
                               n_heads=2, seq_len=64, position="learned", norm="layernorm", activation="gelu",
                               bias=True)
    torch.manual_seed(1)
    folder = export_hf(Transformer(config), config, tokenizer, str(tmp_path / "tiny-gpt2"))
    base = resolve_base(folder, Workspace(str(tmp_path / "workspace")))
    assert (base.kind, base.source, base.tokenizer_json) == ("hf", folder, tokenizer)
    assert base.model_config["position"] == "learned" and base.model_config["n_layers"] == 2
    model = load_model(base.checkpoint).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.config.model_type == "gpt2"
    tokens = torch.randint(0, config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(model(tokens), hf(tokens).logits, atol=1e-4)
    # a second resolve reuses the converted checkpoint (the finetune-base stage)
    assert resolve_base(folder, Workspace(str(tmp_path / "workspace"))).checkpoint == base.checkpoint


@pytest.mark.parametrize("family", ["llama3-rope-scaling", "qwen2"])
def test_published_llama3_and_qwen2_folders_resolve_to_bases_with_equal_logits(hf_folder, tmp_path, family):
    """As transformers saves them (random weights): checked, imported once, and stored as a raylm checkpoint
    whose model_config.json (with `rope_scaling` / `qkv_bias`) loads back to the same logits."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(f"{hf_folder}/tokenizer.json").get_vocab_size()
    sizes = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    if family == "qwen2":
        hf_config = transformers.Qwen2Config(**sizes, rope_theta=1e6)
    else:
        hf_config = transformers.LlamaConfig(**sizes, rope_theta=500000.0, rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=32))
    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    folder = tmp_path / family
    hf.save_pretrained(folder)
    shutil.copy(f"{hf_folder}/tokenizer.json", folder / "tokenizer.json")
    base = resolve_base(str(folder), Workspace(str(tmp_path / "workspace")))
    assert base.kind == "hf" and base.model_config["qkv_bias"] == (family == "qwen2")
    assert (base.model_config["rope_scaling"] is None) == (family == "qwen2")
    model = load_model(base.checkpoint).eval()
    tokens = torch.randint(0, vocab, (1, 100))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-5

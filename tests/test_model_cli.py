"""`raylm export` and `raylm generate` on a real (DCP) checkpoint written by the trainer's saver."""

from __future__ import annotations

import os

import pytest
import torch

from raylm.cli import main
from raylm.model import TransformerConfig, build_model
from raylm.train.checkpoint import save_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture()
def checkpoint(tmp_path):
    from test_model_hf import tokenizer_json

    config = TransformerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, seq_len=32)
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters())
    directory = str(tmp_path / "ckpt")
    save_checkpoint(directory, model, optimizer, {"step": 1}, config.to_dict(), tokenizer_json(), rank=0)
    return directory, model


def test_export_then_generate_from_both(checkpoint, tmp_path, capsys):
    directory, model = checkpoint
    out = str(tmp_path / "hf")
    assert main(["export", "--checkpoint", directory, "--out", out]) == 0
    modes = {name: os.stat(os.path.join(out, name)).st_mode & 0o777 for name in os.listdir(out)}
    assert len(set(modes.values())) == 1, modes  # model.safetensors as readable as the other files
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    tokens = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf_model(tokens).logits, model(tokens), atol=1e-4)
    capsys.readouterr()
    outputs = []
    for source in (directory, out):
        assert main(["generate", "--checkpoint", source, "--prompt", "def f(x):", "--prompt", "return",
                     "--max-new-tokens", "8"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert outputs[0].startswith("def f(x):") and "\nreturn" in outputs[0]
    assert main(["generate", "--checkpoint", directory, "--prompt", "def", "--temperature", "0.9",
                 "--top-k", "20", "--top-p", "0.9", "--stop", "x"]) == 0
    assert "x" not in capsys.readouterr().out.removeprefix("def")
    # --stop takes escape sequences: the first two generated characters, written escaped, stop at once
    assert main(["generate", "--checkpoint", directory, "--prompt", "def", "--max-new-tokens", "8"]) == 0
    free = capsys.readouterr().out.removeprefix("def").removesuffix("\n")
    escaped = free[:2].encode("unicode_escape").decode("ascii")
    assert main(["generate", "--checkpoint", directory, "--prompt", "def", "--max-new-tokens", "8",
                 "--stop", escaped]) == 0
    assert capsys.readouterr().out == "def\n"


def test_stop_sequences_decode_escapes_and_keep_other_text():
    from raylm.cli import build_parser, decode_escapes

    assert decode_escapes("\\n\\n") == "\n\n" and decode_escapes("é\\t中") == "é\t中"
    args = build_parser().parse_args(["generate", "--checkpoint", "c", "--prompt", "p", "--stop", "\\n\\n"])
    assert args.stop == ["\n\n"]


def test_export_refuses_the_encoder_decoder(tmp_path, capsys):
    config = TransformerConfig(vocab_size=50, d_model=16, n_layers=1, n_heads=2, seq_len=16, arch="encoder-decoder")
    model = build_model(config)
    directory = str(tmp_path / "ckpt")
    save_checkpoint(directory, model, torch.optim.AdamW(model.parameters()), {"step": 1}, config.to_dict(), None, rank=0)
    assert main(["export", "--checkpoint", directory, "--out", str(tmp_path / "hf")]) == 2
    assert "only decoder models" in capsys.readouterr().err

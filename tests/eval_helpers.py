"""A tiny real raylm checkpoint for the evaluation tests: a BPE tokenizer trained on a few texts and a
small randomly initialised transformer, saved through the normal checkpoint code."""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.config import TokenizerConfig
from raylm.data.tokenizer import train_tokenizer
from raylm.model import Transformer, TransformerConfig
from raylm.train.checkpoint import save_checkpoint

TEXTS = [
    "Question: Which gas do plants take in? Answer: carbon dioxide. The sun is a star.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "A man is sitting on a roof. He starts pulling up roofing. The answer is 42. #### 42",
    "Water boils at 100 degrees. The cat sat on the mat. Ice melts when it gets warm.",
] * 20


def make_checkpoint(directory: Path, seq_len: int = 128, d_model: int = 32, n_layers: int = 2,
                    vocab_size: int = 400, seed: int = 0) -> Path:
    tokenizer = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=vocab_size, min_frequency=1))
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=d_model, n_layers=n_layers,
                               n_heads=4, seq_len=seq_len)
    model = Transformer(config)
    with torch.no_grad():  # larger weights than the init, so that choices get clearly different scores
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(8)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(str(directory), model, optimizer, {"step": 0}, config.to_dict(), tokenizer.to_str(), rank=0)
    return directory


def write_long_quiz(path: Path, long_choice: bool = True) -> Path:
    """An ARC-layout quiz whose items outgrow a small model's context: one short item, one whose question
    is far longer than the window (its context is left-truncated) and, with `long_choice`, one whose
    choice alone is longer than the window (scored in windows)."""
    import json

    rows = [{"query": "Question: Which gas do plants take in?", "choices": [" carbon dioxide", " oxygen"], "gold": 0},
            {"query": "Question: " + "Water boils at 100 degrees. The cat sat on the mat. " * 30 + "Why?",
             "choices": [" it is warm", " ice melts"], "gold": 0}]
    if long_choice:
        rows.append({"query": "Question: What did the cat do?",
                     "choices": [" The cat sat on the mat. " * 40, " nothing"], "gold": 0})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path

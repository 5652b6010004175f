"""Helpers for the training tests: tiny packed shards from real stdlib text, and tiny trainer configs."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raylm.config import ModelConfig, TokenizerConfig, TrainConfig
from raylm.data.pack import encode_and_pack
from raylm.data.tokenizer import PAD, fingerprint, special_id, train_tokenizer

SEQ_LEN = 32


def stdlib_texts(limit_bytes: int = 150_000) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py"):
            text = (root / name).read_text(errors="replace")
            texts.append(text)
            total += len(text)
            if total >= limit_bytes:
                break
    return texts


def make_packed(folder: Path, seq_len: int = SEQ_LEN, vocab_size: int = 300, loss_mask: bool = False) -> dict:
    """A packed manifest like the tokenize stage's: two parquet shards of train, one of val."""
    texts = stdlib_texts()
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=vocab_size, sample_bytes=10**6))
    tokenizer_json = tokenizer.to_str()
    (folder / "tokenizer.json").write_text(tokenizer_json)
    split = int(len(texts) * 0.9)
    outputs = {}
    for name, chunk in (("train", texts[:split]), ("val", texts[split:])):
        (folder / name).mkdir(parents=True, exist_ok=True)
        halves = [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]] if name == "train" else [chunk]
        for part, docs in enumerate(halves):
            table = encode_and_pack(pd.DataFrame({"text": docs}), tokenizer_json, seq_len)
            if loss_mask:
                width = seq_len + 1
                mask = np.ones((table.num_rows, width), dtype=np.int8)
                mask[:, : width // 2] = 0  # the first half of each row is "prompt"
                table = table.append_column("loss_mask", pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), width))
            pq.write_table(table, folder / name / f"part-{part}.parquet")
        outputs[name] = str(folder / name)
    return {"outputs": outputs, "seq_len": seq_len,
            "tokenizer": {"path": str(folder / "tokenizer.json"), "vocab_size": tokenizer.get_vocab_size(),
                          "pad_id": special_id(tokenizer, PAD), "fingerprint": fingerprint(tokenizer_json)}}


def tiny_model() -> ModelConfig:
    return ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=SEQ_LEN)


def tiny_train(**overrides) -> TrainConfig:
    base = dict(workers=1, lr=3e-3, warmup_steps=2, max_steps=20, micro_batch_size=4, global_batch_size=8,
                eval_every=10, eval_sequences=16, checkpoint_every=10, report_every=10, use_gpu=False,
                deterministic=True)
    base.update(overrides)
    return TrainConfig(**base)

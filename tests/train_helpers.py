"""Helpers for the training tests: tiny packed shards from real stdlib text, and tiny trainer configs."""

from __future__ import annotations

from pathlib import Path

from raylm.artifacts import Packed
from raylm.config import TrainConfig
from raylm.model import TransformerConfig
from tests.stdlib_corpus import stdlib_packed

SEQ_LEN = 32


def make_packed(folder: Path, seq_len: int = SEQ_LEN, vocab_size: int = 300, loss_mask: bool = False) -> Packed:
    return stdlib_packed(folder, seq_len, vocab_size=vocab_size, corpus_bytes=150_000, loss_mask=loss_mask)


def tiny_model() -> TransformerConfig:
    return TransformerConfig(d_model=32, n_layers=2, n_heads=2, seq_len=SEQ_LEN)


def tiny_train(**overrides) -> TrainConfig:
    base = dict(workers=1, lr=3e-3, warmup_steps=2, max_steps=20, micro_batch_size=4, global_batch_size=8,
                eval_every=10, eval_sequences=16, checkpoint_every=10, report_every=10, use_gpu=False,
                deterministic=True)
    base.update(overrides)
    return TrainConfig(**base)

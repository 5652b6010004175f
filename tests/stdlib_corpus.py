"""Packed shards from the built-in python-stdlib corpus in one process, without the curate and
tokenize stages: for benchmarks, GPU smoke checks and tests that need real token data in seconds.

The result is the tokenize stage's artifact (`raylm.artifacts.Packed`), so `build_trainer` takes it as
is. Test and benchmark support only (benchmarks/train.py and gpu_check.py import it from here), so it
lives outside the package.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylm.artifacts import Packed, TokenizerRef
from raylm.config import TokenizerConfig
from raylm.data.pack import encode_and_pack
from raylm.data.token_files import token_dtype, write_index, write_shard_files
from raylm.data.tokenizer import EOS, PAD, fingerprint, special_id, train_tokenizer


def stdlib_texts(limit_bytes: int) -> list[str]:
    """Source files of the running interpreter's standard library, in a fixed order, about `limit_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for directory, subdirs, files in os.walk(root):
        subdirs.sort()
        if "site-packages" in directory or "test" in Path(directory).parts:
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            text = (Path(directory) / name).read_text(errors="replace")
            texts.append(text)
            total += len(text)
            if total >= limit_bytes:
                return texts
    return texts


def stdlib_packed(folder: str | Path, seq_len: int, vocab_size: int = 512, corpus_bytes: int = 150_000,
                  val_fraction: float = 0.1, train_shards: int = 2, loss_mask: bool = False,
                  token_files: bool = True) -> Packed:
    """Train a BPE tokenizer on the stdlib sample and pack it into train/val parquet shards under `folder`.

    `loss_mask=True` adds a `loss_mask` column that masks out the first half of every row (as chat
    data masks its prompts), for exercising masked training. `token_files=False` leaves out the
    fixed-width token files the stages write beside the shards (a workspace from before they existed).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts(corpus_bytes)
    tokenizer = train_tokenizer(texts, TokenizerConfig(vocab_size=vocab_size, sample_bytes=corpus_bytes))
    tokenizer_json = tokenizer.to_str()
    (folder / "tokenizer.json").write_text(tokenizer_json)
    split = max(1, int(len(texts) * (1 - val_fraction)))
    filesystem, dtype, width = pafs.LocalFileSystem(), token_dtype(tokenizer.get_vocab_size()).str, seq_len + 1
    outputs = {}
    for name, chunk in (("train", texts[:split]), ("val", texts[split:])):
        (folder / name).mkdir(exist_ok=True)
        parts = train_shards if name == "train" else 1
        shards = []
        for part in range(parts):
            docs = chunk[part::parts]
            table = encode_and_pack(pd.DataFrame({"text": docs}), tokenizer_json, seq_len)
            if loss_mask:
                width = seq_len + 1
                mask = np.ones((table.num_rows, width), dtype=np.int8)
                mask[:, : width // 2] = 0
                table = table.append_column("loss_mask", pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), width))
            pq.write_table(table, folder / name / f"part-{part}.parquet")
            if token_files:
                shards.append(write_shard_files(table.to_batches(), filesystem, str(folder / name),
                                                str(folder / name / f"part-{part}.parquet"), loss_mask, dtype, width))
        if token_files:
            write_index(filesystem, str(folder / name), shards, dtype, width)
        outputs[name] = str(folder / name)
    reference = TokenizerRef(path=str(folder / "tokenizer.json"), vocab_size=tokenizer.get_vocab_size(),
                             pad_id=special_id(tokenizer, PAD), eos_id=special_id(tokenizer, EOS),
                             fingerprint=fingerprint(tokenizer_json))
    return Packed(tokenizer=reference, seq_len=seq_len, outputs=outputs)

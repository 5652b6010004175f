"""Sequence packing, one batch at a time.

Documents are encoded, each followed by `<|eos|>`, concatenated, and cut into rows of `seq_len + 1`
tokens (inputs and next-token targets overlap by one). The tail of a batch becomes one last row padded
with `<|pad|>`, so every token of the input lands in exactly one row. Each row carries `n_tokens`
(real, non-pad tokens) and `n_bytes` (bytes of text those tokens stand for). Rows are
written as a plain fixed-size list column of int32, readable by any parquet tool.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

from raylm.data.tokenizer import EOS, PAD, special_id, token_byte_lengths, tokenizer_from_json


def pack_tokens(token_lists: list[list[int]], seq_len: int, eos_id: int, pad_id: int) -> np.ndarray:
    """Join documents with EOS and cut into [rows, seq_len + 1], padding the last row."""
    width = seq_len + 1
    if not token_lists:
        return np.zeros((0, width), dtype=np.int32)
    stream = np.concatenate([np.append(np.asarray(ids, dtype=np.int32), eos_id) for ids in token_lists])
    rows = -(-len(stream) // width)
    packed = np.full(rows * width, pad_id, dtype=np.int32)
    packed[: len(stream)] = stream
    return packed.reshape(rows, width)


def encode_and_pack(batch: pd.DataFrame, tokenizer_json: str, seq_len: int) -> pa.Table:
    tokenizer = tokenizer_from_json(tokenizer_json)
    eos_id, pad_id = special_id(tokenizer, EOS), special_id(tokenizer, PAD)
    encodings = tokenizer.encode_batch(batch["text"].tolist(), add_special_tokens=False)
    packed = pack_tokens([e.ids for e in encodings], seq_len, eos_id, pad_id)
    byte_lengths = _byte_lengths(tokenizer_json)
    return pa.table({
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1), pa.int32()), seq_len + 1),
        "n_tokens": pa.array((packed != pad_id).sum(axis=1), pa.int64()),
        "n_bytes": pa.array(byte_lengths[packed].sum(axis=1), pa.int64()),
    })


_BYTE_LENGTHS: dict[int, np.ndarray] = {}


def _byte_lengths(tokenizer_json: str) -> np.ndarray:
    key = hash(tokenizer_json)
    if key not in _BYTE_LENGTHS:
        _BYTE_LENGTHS[key] = token_byte_lengths(tokenizer_from_json(tokenizer_json))
    return _BYTE_LENGTHS[key]

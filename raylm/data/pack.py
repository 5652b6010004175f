"""Sequence packing, one batch at a time: plain functions that Ray Data's `map_batches` wraps.

Each document is encoded and followed by `<|eos|>`; rows hold `seq_len + 1` tokens (inputs and
next-token targets overlap by one). Two ways to fill rows:

- greedy: concatenate the batch's documents and cut the stream into rows; documents cross row
  boundaries, and only the batch's last row is padded.
- best_fit: a document that fits in a row is never split. Longer documents fill whole rows first;
  what is left of them, and every shorter document, goes into the open row with the least free room
  that still holds it (best-fit decreasing), padding the rest with `<|pad|>`.

Either way every token of the input lands in exactly one row. Each row carries `n_tokens` (real,
non-pad tokens) and `n_bytes` (bytes of text those tokens stand for). Rows are written as a plain
fixed-size list column of int32, readable by any parquet tool.
"""

from __future__ import annotations

import bisect
import os
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
from tokenizers import Tokenizer

from raylm.data.tokenizer import EOS, PAD, special_id, token_byte_lengths, tokenizer_from_json

PACKINGS = ("greedy", "best_fit")


def _documents(token_lists: list[list[int]], eos_id: int) -> list[np.ndarray]:
    return [np.append(np.asarray(ids, dtype=np.int32), np.int32(eos_id)) for ids in token_lists]


def pack_greedy(token_lists: list[list[int]], seq_len: int, eos_id: int, pad_id: int) -> np.ndarray:
    """Join documents with EOS and cut into [rows, seq_len + 1], padding the last row."""
    width = seq_len + 1
    if not token_lists:
        return np.zeros((0, width), dtype=np.int32)
    stream = np.concatenate(_documents(token_lists, eos_id))
    rows = -(-len(stream) // width)
    packed = np.full(rows * width, pad_id, dtype=np.int32)
    packed[: len(stream)] = stream
    return packed.reshape(rows, width)




def pack_best_fit(token_lists: list[list[int]], seq_len: int, eos_id: int, pad_id: int) -> np.ndarray:
    """Rows of seq_len + 1 tokens in which no document that fits a row is split across rows."""
    width = seq_len + 1
    full_rows: list[np.ndarray] = []
    pieces: list[np.ndarray] = []
    for document in _documents(token_lists, eos_id):
        whole = len(document) // width * width if len(document) > width else 0
        if whole:
            full_rows.append(document[:whole].reshape(-1, width))
        if len(document) > whole:
            pieces.append(document[whole:])
    pieces.sort(key=len, reverse=True)  # stable: equal lengths keep document order

    bins: list[list[np.ndarray]] = []
    free: list[tuple[int, int]] = []  # (free room, bin index), sorted
    for piece in pieces:
        at = bisect.bisect_left(free, (len(piece), -1))
        if at == len(free):
            bins.append([piece])
            room, index = width - len(piece), len(bins) - 1
        else:
            room, index = free.pop(at)
            bins[index].append(piece)
            room -= len(piece)
        if room:
            bisect.insort(free, (room, index))

    packed = np.full((len(bins), width), pad_id, dtype=np.int32)
    for row, contents in enumerate(bins):
        joined = np.concatenate(contents)
        packed[row, : len(joined)] = joined
    return np.concatenate([*full_rows, packed]) if full_rows else packed


def pack(token_lists: list[list[int]], seq_len: int, eos_id: int, pad_id: int, packing: str = "greedy") -> np.ndarray:
    if packing == "greedy":
        return pack_greedy(token_lists, seq_len, eos_id, pad_id)
    if packing == "best_fit":
        return pack_best_fit(token_lists, seq_len, eos_id, pad_id)
    raise ValueError(f"tokenizer.packing = {packing!r}: expected one of {PACKINGS}")


def encode_and_pack(batch: pd.DataFrame | pa.Table | pa.RecordBatch, tokenizer_json: str, seq_len: int,
                    packing: str = "greedy", threads: int | None = None) -> pa.Table:
    """A batch of documents (`text` column, pandas or Arrow) -> packed rows with token and byte counts.

    `threads=1` keeps `tokenizers` from starting its own thread pool inside a one-CPU Ray worker.
    """
    if threads == 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = document_tokenizer(tokenizer_json)
    eos_id, pad_id = special_id(tokenizer, EOS), special_id(tokenizer, PAD)
    texts = batch["text"]
    texts = texts.to_pylist() if isinstance(texts, (pa.Array, pa.ChunkedArray)) else texts.tolist()
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    packed = pack([e.ids for e in encodings], seq_len, eos_id, pad_id, packing)
    return packed_table(packed, pad_id, _byte_lengths(tokenizer_json))


@lru_cache(maxsize=4)
def document_tokenizer(tokenizer_json: str) -> Tokenizer:
    """The tokenizer for corpus text: a literal `<|eos|>` inside a document is encoded as plain bytes,
    so only packing puts special tokens into sequences and every byte of text is counted."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True
    return tokenizer


def packed_table(packed: np.ndarray, pad_id: int, byte_lengths: np.ndarray) -> pa.Table:
    width = packed.shape[1]
    return pa.table({
        "tokens": pa.FixedSizeListArray.from_arrays(pa.array(packed.reshape(-1), pa.int32()), width),
        "n_tokens": pa.array((packed != pad_id).sum(axis=1), pa.int64()),
        "n_bytes": pa.array(byte_lengths[packed].sum(axis=1), pa.int64()),
    })


_BYTE_LENGTHS: dict[str, np.ndarray] = {}


def _byte_lengths(tokenizer_json: str) -> np.ndarray:
    if tokenizer_json not in _BYTE_LENGTHS:
        _BYTE_LENGTHS.clear()
        _BYTE_LENGTHS[tokenizer_json] = token_byte_lengths(tokenizer_from_json(tokenizer_json))
    return _BYTE_LENGTHS[tokenizer_json]

"""Word n-gram hashing for a whole batch at once, shared by near dedup (shingles) and decontamination.

Texts are lower-cased and split into runs of word characters, so "Alice’s" and "Alice 's" give the
same words. Every word of the batch is hashed in one vectorised call (`pandas.util.hash_array`,
SipHash with a fixed key: the same value in every process, unlike Python's `hash()`), and an n-gram
hash is a polynomial of its word hashes computed with numpy over the concatenated batch. Nothing here
loops over n-grams in Python, which is what makes signatures fast.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

WORD = re.compile(r"\w+")
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2**64


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngram_hashes(texts: Sequence[str], n: int, short_docs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word n-gram of every text, concatenated, and each text's offsets.

    Returns `(hashes, offsets)` with the n-grams of text `i` at `hashes[offsets[i]:offsets[i + 1]]`.
    A text with fewer than `n` words gives one n-gram of all its words when `short_docs` (so short
    documents still get a signature), none otherwise; a text without words gives none.
    """
    per_doc = [words(text) for text in texts]
    lengths = np.fromiter((len(w) for w in per_doc), dtype=np.int64, count=len(per_doc))
    flat = [word for doc in per_doc for word in doc]
    if not flat:
        return np.zeros(0, dtype=np.uint64), np.zeros(len(texts) + 1, dtype=np.int64)
    word_hashes = pd.util.hash_array(np.asarray(flat, dtype=object), categorize=True).astype(np.uint64)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    total = len(word_hashes)
    count = max(total - n + 1, 0)
    # polynomial rolling combination over the concatenated words; windows that cross a document
    # boundary are dropped below
    with np.errstate(over="ignore"):
        combined = word_hashes[:count].copy() if count else np.zeros(0, dtype=np.uint64)
        for k in range(1, n):
            combined = combined * _MULTIPLIER + word_hashes[k:k + count]
    pieces, offsets = [], [0]
    for i in range(len(texts)):
        start, length = int(starts[i]), int(lengths[i])
        piece = None
        if length >= n:
            piece = combined[start:start + length - n + 1]
        elif length and short_docs:
            value = np.uint64(length)
            with np.errstate(over="ignore"):
                for h in word_hashes[start:start + length]:
                    value = value * _MULTIPLIER + h
            piece = np.array([value], dtype=np.uint64)
        if piece is not None:
            pieces.append(piece)
        offsets.append(offsets[-1] + (0 if piece is None else len(piece)))
    hashes = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint64)
    return hashes, np.asarray(offsets, dtype=np.int64)


def shingle_set(text: str, n: int) -> set[int]:
    """The distinct n-gram hashes of one text (for exact Jaccard checks)."""
    hashes, _ = ngram_hashes([text], n)
    return set(hashes.tolist())


def jaccard(a: set[int], b: set[int]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)

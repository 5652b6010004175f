"""Byte-level BPE tokenizer: training on the curated train split, loading, fingerprints, byte lengths.

Built on Hugging Face `tokenizers`. Byte-level BPE never fails to encode and decodes back to the exact
input, so every token stands for an exact number of bytes; `token_byte_lengths` gives that number per
id (0 for special tokens), which is what makes bits-per-byte exact.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.config import TokenizerConfig

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(config.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def fingerprint(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def tokenizer_from_json(tokenizer_json: str) -> Tokenizer:
    """Parse once per process (Ray Data calls the batch functions many times)."""
    return Tokenizer.from_str(tokenizer_json)


def special_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"tokenizer has no special token {token!r}; tokenizer.special_tokens must include it")
    return found


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte -> printable-character table used by the ByteLevel pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(printable, codes)}


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes of text each token id stands for; 0 for added (special) tokens."""
    decoder = _byte_decoder()
    specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
    lengths = np.zeros(tokenizer.get_vocab_size(with_added_tokens=True), dtype=np.int64)
    for token, index in tokenizer.get_vocab(with_added_tokens=True).items():
        if token in specials:
            continue
        lengths[index] = sum(1 for ch in token if ch in decoder)
    return lengths


def take_sample(batches: Iterator[list[str]], max_bytes: int) -> Iterator[str]:
    """Texts from a stream of batches until about `max_bytes` have been yielded."""
    seen = 0
    for batch in batches:
        for text in batch:
            yield text
            seen += len(text.encode("utf-8", "surrogatepass"))
            if seen >= max_bytes:
                return

"""Byte-level BPE tokenizer: training, special tokens, saving for `transformers`, fingerprints, byte lengths.

Built on Hugging Face `tokenizers`. Text is first split by a GPT-style regex (words, digit runs,
punctuation, whitespace), then mapped to GPT-2's printable byte alphabet, then merged by BPE. Byte-level
BPE never fails to encode and decodes back to the exact input, so every token stands for an exact
number of bytes; `token_byte_lengths` gives that number per id (0 for special tokens), which is what
makes bits-per-byte exact.

Special tokens (in this order, so their ids are 0..6 in a freshly trained tokenizer): `<|bos|>`,
`<|eos|>` (joins documents in packed sequences), `<|pad|>`, and the chat tokens `<|system|>`,
`<|user|>`, `<|assistant|>`, `<|end|>` that fine-tuning's chat template builds on.
`save_tokenizer` writes `tokenizer.json` plus the two small JSON files with which
`transformers.PreTrainedTokenizerFast.from_pretrained(folder)` loads it offline.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import lru_cache
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from raylm.config import TokenizerConfig

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
DEFAULT_SPECIAL_TOKENS = (BOS, EOS, PAD, *CHAT_TOKENS)
REQUIRED_SPECIAL_TOKENS = (EOS, PAD)
BYTE_ALPHABET_SIZE = 256

# GPT-2's split, and GPT-4's (cl100k): contractions, letter runs, digit runs of at most {digits}
# (1 = every digit alone, so numbers are not memorised as whole tokens), punctuation, whitespace.
SPLIT_PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,DIGITS}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,DIGITS}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def split_pattern(name: str, max_digits: int) -> str:
    return SPLIT_PATTERNS[name].replace("DIGITS", str(max_digits))


def new_tokenizer(config: TokenizerConfig) -> Tokenizer:
    """An untrained byte-level BPE tokenizer with the configured regex split."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern(config.pre_tokenizer, config.max_digits)),
                             behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(texts: Iterable[str], config: TokenizerConfig) -> Tokenizer:
    """Train on a stream of texts (consumed once, never held in memory as a whole)."""
    tokenizer = new_tokenizer(config)
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


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json` file, or a folder holding one; a clear error when it does not parse."""
    if os.path.isdir(path):
        path = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {os.path.abspath(path)}")
    try:
        return Tokenizer.from_file(path)
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise ValueError(f"{path}: not a tokenizer.json file that `tokenizers` can parse ({error})") from None


def special_id(tokenizer: Tokenizer, token: str) -> int:
    found = tokenizer.token_to_id(token)
    if found is None:
        raise ValueError(f"tokenizer has no special token {token!r}; tokenizer.special_tokens must include it")
    return found


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Every special (added) token of the tokenizer, by its text: {'<|bos|>': 0, '<|eos|>': 1, ...}."""
    return {added.content: index for index, added in sorted(tokenizer.get_added_tokens_decoder().items())
            if added.special}


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int | None = None) -> dict[str, str]:
    """The files `transformers.PreTrainedTokenizerFast.from_pretrained` needs, by name, as text.

    bos/eos/pad are named when the tokenizer has them; the other special tokens (chat) are listed as
    additional special tokens. Clean-up of spaces is off so that decoding is exact.
    """
    specials = special_token_ids(tokenizer)
    roles = {name: token for name, token in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD))
             if token in specials}
    additional = [token for token in specials if token not in roles.values()]
    special_map: dict[str, object] = {**roles}
    if additional:
        special_map["additional_special_tokens"] = additional
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length or 1_000_000_000_000_000_019_884_624_838_656,
        "padding_side": "right",
        **special_map,
    }
    return {
        TOKENIZER_FILE: tokenizer.to_str(),
        TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2),
        SPECIAL_TOKENS_MAP_FILE: json.dumps(special_map, indent=2),
    }


def save_tokenizer(tokenizer: Tokenizer, folder: str, model_max_length: int | None = None) -> str:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder` (created
    if needed), loadable offline by `PreTrainedTokenizerFast.from_pretrained(folder)`; returns the
    path of tokenizer.json."""
    os.makedirs(folder, exist_ok=True)
    for name, text in hf_tokenizer_files(tokenizer, model_max_length).items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    return os.path.join(folder, TOKENIZER_FILE)


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

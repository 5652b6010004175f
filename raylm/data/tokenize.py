"""The `tokenize` stage: train (or reuse) a tokenizer on the curated train split, then pack both splits.

The tokenizer sees a streamed sample of the train split only; the val split is held out from it.
Packing runs in Ray Data `map_batches` and writes parquet shards per split, plus a manifest with the
tokenizer fingerprint, the sequence length and, per split, the sequences, tokens and bytes behind them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import ray.data
from ray.data.aggregate import Count, Sum
from tokenizers import Tokenizer

from raylm.config import TokenizerConfig
from raylm.data.pack import encode_and_pack
from raylm.data.tokenizer import EOS, PAD, fingerprint, special_id, take_sample, train_tokenizer
from raylm.workspace import StageDir

log = logging.getLogger("raylm")

SPLITS = ("train", "val")


def load_or_train_tokenizer(config: TokenizerConfig, train_uri: str) -> Tokenizer:
    if config.path:
        try:
            tokenizer = Tokenizer.from_file(config.path)
        except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
            raise ValueError(f"tokenizer.path = {config.path!r}: not a tokenizer.json file ({error})") from None
    else:
        texts = ray.data.read_parquet(train_uri, columns=["text"])
        batches = (batch["text"] for batch in texts.iter_batches(batch_size=256, batch_format="numpy"))
        tokenizer = train_tokenizer(take_sample(batches, config.sample_bytes), config)
    for token in (EOS, PAD):
        special_id(tokenizer, token)
    return tokenizer


def pack_split(source_uri: str, tokenizer_json: str, seq_len: int, stage: StageDir, split: str) -> dict[str, int]:
    packed = ray.data.read_parquet(source_uri, columns=["text"]).map_batches(
        encode_and_pack, batch_format="pandas", fn_kwargs={"tokenizer_json": tokenizer_json, "seq_len": seq_len})
    packed.write_parquet(stage.fs_path(split), filesystem=stage.fs)
    written = ray.data.read_parquet(stage.path(split), columns=["n_tokens", "n_bytes"])
    totals = written.aggregate(Count(), Sum("n_tokens"), Sum("n_bytes"))
    return {"sequences": int(totals["count()"]), "tokens": int(totals["sum(n_tokens)"] or 0),
            "bytes": int(totals["sum(n_bytes)"] or 0)}


def tokenize(config: TokenizerConfig, seq_len: int, curated: dict[str, Any], stage: StageDir) -> dict[str, Any]:
    outputs = curated["outputs"]
    if curated["counts"]["train"] == 0:
        raise ValueError(f"the curated train split at {outputs['train']} is empty: nothing to train on")
    tokenizer = load_or_train_tokenizer(config, outputs["train"])
    tokenizer_json = tokenizer.to_str()
    stage.write_text("tokenizer.json", tokenizer_json)

    splits = {}
    for split in SPLITS:
        if curated["counts"].get(split, 0) == 0:
            splits[split] = {"sequences": 0, "tokens": 0, "bytes": 0}
            continue
        splits[split] = pack_split(outputs[split], tokenizer_json, seq_len, stage, split)
    if splits["train"]["sequences"] == 0:
        raise ValueError("packing produced no train sequences")

    val = splits["val"]
    bytes_per_token = val["bytes"] / val["tokens"] if val["tokens"] else math.nan
    metrics = {"vocab_size": tokenizer.get_vocab_size(), "val_bytes_per_token": bytes_per_token}
    for split, counts in splits.items():
        for name, value in counts.items():
            metrics[f"{split}_{name}"] = value
    log.info("tokenize: vocab %d, %.2f bytes/token on val, %d train sequences of %d tokens",
             tokenizer.get_vocab_size(), bytes_per_token, splits["train"]["sequences"], seq_len + 1)
    return {
        "metrics": metrics,
        "tokenizer": {"path": stage.path("tokenizer.json"), "fingerprint": fingerprint(tokenizer_json),
                      "vocab_size": tokenizer.get_vocab_size(),
                      "eos_id": special_id(tokenizer, EOS), "pad_id": special_id(tokenizer, PAD)},
        "seq_len": seq_len,
        "splits": splits,
        "outputs": {split: stage.path(split) for split in SPLITS if splits[split]["sequences"]},
    }

"""The `tokenize` stage: train (or reuse) a tokenizer on the curated train split, then pack both splits.

The tokenizer sees a random sample (about `tokenizer.sample_bytes`) of the train split, streamed from
Ray Data into the trainer batch by batch; the val split is held out from it. Reuse instead of training:
`tokenizer.path` (a tokenizer.json, a folder holding one, or `runs:/RUN_ID/tokenizer` of an earlier
tokenize run in MLflow). Encoding and packing run in Ray Data `map_batches`, one task per piece of the
split (batched encoding, then greedy or best-fit packing per batch of `batch_size` documents), and write
parquet shards per split from the same tasks; then one task per shard writes its rows again as a
fixed-width token file (`raylm.data.token_files`: what the trainer reads, a row at a time). A manifest has the
tokenizer fingerprint, the sequence length and, per split, the sequences, tokens and bytes behind them.
The tokenizer folder (loadable by `transformers`) is saved in the stage and logged to MLflow.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import ray.data
from tokenizers import Tokenizer

from raylm import tracking
from raylm.artifacts import Curated, Packed, TokenizerRef
from raylm.config import TokenizerConfig
from raylm.data.pack import encode_and_pack
from raylm.data.parquet_pieces import parquet_pieces, read_piece
from raylm.data.token_files import convert_shard, split_parquet_files, token_dtype, write_index
from raylm.failure import step
from raylm.data.tokenizer import (
    BOS,
    BYTE_ALPHABET_SIZE,
    EOS,
    PAD,
    REQUIRED_SPECIAL_TOKENS,
    fingerprint,
    hf_tokenizer_files,
    load_tokenizer,
    special_id,
    special_token_ids,
    take_sample,
    train_tokenizer,
)
from raylm.workspace import StageDir, is_remote, read_text_uri

log = logging.getLogger("raylm")

SPLITS = ("train", "val")
TOKENIZER_DIR = "tokenizer"
SAMPLE_SEED = 0


def fetch_tokenizer(path: str) -> Tokenizer:
    """Load a tokenizer from a file, a folder (local or s3://, gs://) or an MLflow artifact URI
    (`runs:/RUN_ID/tokenizer`)."""
    if path.startswith("runs:/"):
        try:
            local = tracking.download_artifacts(path)
        except Exception as error:  # noqa: BLE001 - MLflow raises several types for a missing run/artifact
            raise ValueError(f"tokenizer.path = {path!r}: cannot fetch it from MLflow ({error})") from None
        return load_tokenizer(local)
    try:
        if is_remote(path):
            return Tokenizer.from_str(read_text_uri(path if path.endswith(".json") else f"{path}/tokenizer.json"))
        return load_tokenizer(path)
    except Exception as error:  # noqa: BLE001 - missing files, unreadable URIs, bad JSON: all the user's to fix
        raise ValueError(f"tokenizer.path = {path!r}: {error}") from None


def check_tokenizer(tokenizer: Tokenizer, origin: str) -> None:
    for token in REQUIRED_SPECIAL_TOKENS:
        if tokenizer.token_to_id(token) is None:
            raise ValueError(f"{origin}: the tokenizer has no {token!r} token (packing needs {REQUIRED_SPECIAL_TOKENS})")


def train_sample(train_uri: str, sample_bytes: int, train_bytes: int | None = None) -> Iterator[str]:
    """About `sample_bytes` of train text, a random sample of the whole split, streamed in batches.

    `train_bytes` (the split's size, when the caller knows it) saves a pass over the data.
    """
    texts = ray.data.read_parquet(train_uri, columns=["text"])
    if train_bytes is None:
        train_bytes = int(ray.data.read_parquet(train_uri, columns=["n_bytes"]).sum("n_bytes") or 0)
    if train_bytes > sample_bytes:
        # a little over the share needed, so that the stream still holds ~sample_bytes after cleaning
        texts = texts.random_sample(min(1.0, 1.2 * sample_bytes / train_bytes), seed=SAMPLE_SEED)
    batches = (batch["text"] for batch in texts.iter_batches(batch_size=256, batch_format="numpy"))
    return take_sample(batches, sample_bytes)


def load_or_train_tokenizer(config: TokenizerConfig, train_uri: str,
                            train_bytes: int | None = None) -> tuple[Tokenizer, str]:
    """The tokenizer and where it came from ('trained' or the reused path)."""
    if config.path:
        tokenizer = fetch_tokenizer(config.path)
        check_tokenizer(tokenizer, f"tokenizer.path = {config.path!r}")
        return tokenizer, config.path
    tokenizer = train_tokenizer(train_sample(train_uri, config.sample_bytes, train_bytes), config)
    if tokenizer.get_vocab_size() <= BYTE_ALPHABET_SIZE + len(config.special_tokens):
        log.warning("tokenize: the train sample learned no merges (vocab %d); is the train split tiny?",
                    tokenizer.get_vocab_size())
    check_tokenizer(tokenizer, "trained tokenizer")
    return tokenizer, "trained"


def save_stage_tokenizer(tokenizer: Tokenizer, stage: StageDir, seq_len: int) -> str:
    """Write the transformers-loadable tokenizer folder into the stage and log it to MLflow."""
    files = hf_tokenizer_files(tokenizer, model_max_length=seq_len)
    for name, text in files.items():
        stage.write_text(f"{TOKENIZER_DIR}/{name}", text)
    tracking.log_files(files, TOKENIZER_DIR)
    return stage.path(TOKENIZER_DIR, "tokenizer.json")


def encode_and_pack_pieces(pieces: pa.Table, filesystem: pafs.FileSystem, tokenizer_json: str, seq_len: int,
                           packing: str, batch_size: int) -> pa.Table:
    """One task's work: read each piece (a parquet file, or some of its row groups) and encode and
    pack it `batch_size` documents at a time."""
    tables = [encode_and_pack(batch, tokenizer_json, seq_len, packing, threads=1)
              for piece in pieces.to_pylist()
              for batch in read_piece(piece, filesystem, ["text"], batch_size)]
    if not tables:
        return encode_and_pack(pa.table({"text": pa.array([], pa.string())}), tokenizer_json, seq_len, packing, threads=1)
    return pa.concat_tables(tables)


def packed_dataset(source_uri: str, tokenizer_json: str, seq_len: int, config: TokenizerConfig) -> ray.data.Dataset:
    """The documents at `source_uri` encoded and packed, lazily: one task per piece of the parquet
    folder (see `parquet_pieces` for why the tasks read the files themselves)."""
    filesystem, pieces = parquet_pieces(source_uri)
    return ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        encode_and_pack_pieces, batch_format="pyarrow", batch_size=1,
        compute=ray.data.TaskPoolStrategy(size=config.concurrency),
        fn_kwargs={"filesystem": filesystem, "tokenizer_json": tokenizer_json, "seq_len": seq_len,
                   "packing": config.packing, "batch_size": config.batch_size})


def write_packed(source_uri: str, tokenizer_json: str, seq_len: int, config: TokenizerConfig, path: str,
                 filesystem: pafs.FileSystem | None = None) -> None:
    """Encode, pack and write parquet shards to `path`, one shard per piece: one fused Ray Data operator.

    The write takes the map's concurrency, so that Ray Data fuses it into the tokenize tasks; and no
    `min_rows_per_file`, which would bundle many pieces (one row each) into one task."""
    packed = packed_dataset(source_uri, tokenizer_json, seq_len, config)
    packed.write_parquet(path, filesystem=filesystem, concurrency=config.concurrency)


def write_token_files(filesystem: pafs.FileSystem, path: str, vocab_size: int, width: int) -> None:
    """The split's fixed-width token files (`raylm.data.token_files`), what the trainer reads: one Ray task
    per parquet shard, each streaming its shard a batch of rows at a time, then the index."""
    dtype = token_dtype(vocab_size).str
    convert = ray.remote(num_cpus=1)(convert_shard)
    shards = ray.get([convert.remote(filesystem, path, shard, dtype, width)
                      for shard in split_parquet_files(filesystem, path)])
    write_index(filesystem, path, shards, dtype, width)


def pack_split(source_uri: str, tokenizer_json: str, seq_len: int, config: TokenizerConfig,
               stage: StageDir, split: str, vocab_size: int) -> dict[str, int]:
    write_packed(source_uri, tokenizer_json, seq_len, config, stage.fs_path(split), stage.fs)
    write_token_files(stage.fs, stage.fs_path(split), vocab_size, seq_len + 1)
    return count_packed(stage, split)


def count_packed(stage: StageDir, split: str) -> dict[str, int]:
    """Sequences, real tokens and text bytes of written shards, from the two small count columns
    (16 bytes per sequence: cheap to sum here, and one Ray Data pass fewer)."""
    table = pads.dataset(stage.fs_path(split), filesystem=stage.fs, format="parquet").to_table(
        columns=["n_tokens", "n_bytes"])
    return {"sequences": table.num_rows, "tokens": int(pc.sum(table["n_tokens"]).as_py() or 0),
            "bytes": int(pc.sum(table["n_bytes"]).as_py() or 0)}


def tokenize(config: TokenizerConfig, seq_len: int, curated: Curated, stage: StageDir) -> Packed:
    outputs = curated.outputs
    if curated.rows("train") == 0:
        raise ValueError(f"the curated train split at {curated.train_uri} is empty: nothing to train on")
    tokenizer, source = load_or_train_tokenizer(config, curated.train_uri, curated.train_bytes())
    tokenizer_json = tokenizer.to_str()
    tokenizer_path = save_stage_tokenizer(tokenizer, stage, seq_len)
    tokenizer_fingerprint = fingerprint(tokenizer_json)
    tracking.set_tags({"raylm.tokenizer.fingerprint": tokenizer_fingerprint, "raylm.tokenizer.source": source})

    splits = {}
    for split in SPLITS:
        documents = curated.rows(split)
        if documents == 0:
            splits[split] = {"documents": 0, "sequences": 0, "tokens": 0, "bytes": 0}
            continue
        with step(f"pack {split}") as shown:
            splits[split] = {"documents": documents,
                             **pack_split(outputs[split], tokenizer_json, seq_len, config, stage, split,
                                          tokenizer.get_vocab_size())}
            shown.update(rows=documents, tokens=splits[split]["tokens"])
    if splits["train"]["sequences"] == 0:
        raise ValueError("packing produced no train sequences")

    val = splits["val"]
    bytes_per_token = val["bytes"] / val["tokens"] if val["tokens"] else math.nan
    width = seq_len + 1
    metrics = {"vocab_size": tokenizer.get_vocab_size(), "val_bytes_per_token": bytes_per_token}
    for split, counts in splits.items():
        for name, value in counts.items():
            metrics[f"{split}_{name}"] = value
        if counts["sequences"]:
            metrics[f"{split}_fill"] = counts["tokens"] / (counts["sequences"] * width)
    log.info("tokenize: vocab %d (%s), %.2f bytes/token on val, %d train sequences of %d tokens (%s packing, "
             "%.1f%% filled)", tokenizer.get_vocab_size(), source, bytes_per_token, splits["train"]["sequences"],
             width, config.packing, 100 * metrics["train_fill"])
    specials = special_token_ids(tokenizer)
    return Packed(
        tokenizer=TokenizerRef(path=tokenizer_path, folder=stage.path(TOKENIZER_DIR), fingerprint=tokenizer_fingerprint,
                               source=source, vocab_size=tokenizer.get_vocab_size(), eos_id=special_id(tokenizer, EOS),
                               pad_id=special_id(tokenizer, PAD), bos_id=specials.get(BOS), special_tokens=specials),
        seq_len=seq_len, packing=config.packing, splits=splits,
        outputs={split: stage.path(split) for split in SPLITS if splits[split]["sequences"]}, metrics=metrics)

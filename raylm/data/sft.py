"""The `sft-data` stage: chat records (any layout of raylm/data/chat_layouts.py) -> packed train/val shards
with a loss mask, in the tokenize layout.

One streaming pass: every row is validated (errors name file:line), rendered with the chat template,
and sent to `train` or `val` by a stable hash of its turns (`val_fraction` held out). Conversations
longer than a row are counted rejections. Every `SHARD_CONVERSATIONS` conversations of a split are
packed whole into rows (`pack_chat_batch`, a plain batch function) and written as one parquet shard
with `tokens` and `loss_mask`, and as the fixed-width token files the trainer reads (`raylm.data.token_files`). The manifest has the same shape as the `tokenize` stage's, so the
trainer reads either. This runs in one process on purpose: instruction sets are small (the Rust
tokenizer renders tens of thousands of conversations a second), and on this scale Ray Data's
per-dataset start-up cost more than the work; memory stays bounded by one shard.

The data's figures (rows per layout, turns, tokens, rows dropped and why) are the stage's metrics
(`data_stats`), logged to MLflow by the stage and carried into the fine-tune run and its summary.
"""

from __future__ import annotations

import json
import logging

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raylm.artifacts import Packed, TokenizerRef
from raylm.data.chat import ChatDataError, chat_token_ids, pack_chat_batch, read_chat, render
from raylm.data.curate import split_of
from raylm.data.token_files import token_dtype, write_index, write_shard_files
from raylm.data.tokenizer import fingerprint, tokenizer_from_json
from raylm.workspace import StageDir

log = logging.getLogger("raylm")

SPLITS = ("train", "val")
SHARD_CONVERSATIONS = 20_000
FIGURES = ("n_tokens", "n_bytes", "n_targets", "n_conversations")


class ShardWriter:
    """Packs and writes one split's conversations, a shard at a time; keeps the running totals."""

    def __init__(self, stage: StageDir, split: str, tokenizer_json: str, seq_len: int):
        self.stage, self.split, self.tokenizer_json, self.seq_len = stage, split, tokenizer_json, seq_len
        self.pending: list[tuple[list[int], list[int]]] = []
        self.shards = 0
        self.dtype = token_dtype(tokenizer_from_json(tokenizer_json).get_vocab_size()).str
        self.token_shards: list[dict] = []
        self.totals = {"sequences": 0, "tokens": 0, "bytes": 0, "targets": 0, "conversations": 0}
        stage.fs.create_dir(stage.fs_path(split), recursive=True)

    def add(self, tokens: list[int], mask: list[int]) -> None:
        self.pending.append((tokens, mask))
        if len(self.pending) >= SHARD_CONVERSATIONS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        batch = pd.DataFrame({"tokens": [t for t, _ in self.pending], "loss_mask": [m for _, m in self.pending]})
        table = pack_chat_batch(batch, self.tokenizer_json, self.seq_len)
        path = self.stage.fs_path(self.split, f"part-{self.shards:05d}.parquet")
        pq.write_table(table, path, filesystem=self.stage.fs)
        self.token_shards.append(write_shard_files(table.to_batches(), self.stage.fs, self.stage.fs_path(self.split),
                                                   path, True, self.dtype, self.seq_len + 1))
        sums = {key: int(pc.sum(table.column(column)).as_py() or 0)
                for column, key in zip(FIGURES, ("tokens", "bytes", "targets", "conversations"))}
        if sums["conversations"] != len(self.pending):
            raise RuntimeError(f"packing {self.split} lost conversations: {len(self.pending)} in, "
                               f"{sums['conversations']} written")
        self.totals["sequences"] += table.num_rows
        for key, value in sums.items():
            self.totals[key] += value
        self.shards += 1
        self.pending = []

    def write_index(self) -> None:
        """The split's token-file index (`raylm.data.token_files`), once every shard is written."""
        write_index(self.stage.fs, self.stage.fs_path(self.split), self.token_shards, self.dtype, self.seq_len + 1)


def sft_data(path: str, tokenizer_json: str, seq_len: int, val_fraction: float, seed: int,
             system_prompt: str | None, stage: StageDir, layout: str | None = None,
             columns: dict[str, str] | None = None) -> Packed:
    """`layout`: read every row as this layout (None: each row by the layout its keys match)."""
    tokenizer = tokenizer_from_json(tokenizer_json)
    ids = chat_token_ids(tokenizer)
    writers = {split: ShardWriter(stage, split, tokenizer_json, seq_len) for split in SPLITS}
    counts = {"rows": 0, "rejected_too_long": 0}
    stats: dict[str, int] = {"turns": 0, "tokens_rendered": 0}
    for row in read_chat(path, system_prompt, layout, columns):
        counts["rows"] += 1
        stats[f"rows_layout_{row.layout}"] = stats.get(f"rows_layout_{row.layout}", 0) + 1
        stats["turns"] += len(row.turns)
        tokens, mask = render(row.turns, tokenizer, ids)
        stats["tokens_rendered"] += len(tokens)
        if len(tokens) > seq_len + 1:
            counts["rejected_too_long"] += 1
            continue
        writers[split_of(json.dumps(row.turns, sort_keys=True), val_fraction, seed)].add(tokens, mask)
    for writer in writers.values():
        writer.flush()
        writer.write_index()
    if counts["rejected_too_long"]:
        log.warning("sft-data: %d of %d conversations are longer than seq_len + 1 = %d tokens and were rejected",
                    counts["rejected_too_long"], counts["rows"], seq_len + 1)
    for split, writer in writers.items():
        if writer.totals["conversations"] == 0:
            raise ChatDataError(f"{path}: no {split} conversations after holding out finetune.val_fraction = "
                                f"{val_fraction} of {counts['rows']} rows ({counts['rejected_too_long']} too long "
                                f"for seq_len {seq_len}); add rows or change finetune.val_fraction")
    stage.write_text("tokenizer.json", tokenizer_json)
    metrics: dict[str, float] = {"rows_input": counts["rows"], "rows_rejected_too_long": counts["rejected_too_long"],
                                 **stats}
    for split, writer in writers.items():
        for name, value in writer.totals.items():
            metrics[f"{split}_{name}"] = value
    log.info("sft-data: %d conversations -> %d train / %d val packed rows of %d tokens", counts["rows"],
             writers["train"].totals["sequences"], writers["val"].totals["sequences"], seq_len + 1)
    return Packed(
        tokenizer=TokenizerRef(path=stage.path("tokenizer.json"), fingerprint=fingerprint(tokenizer_json),
                               vocab_size=tokenizer.get_vocab_size(), eos_id=ids["eos"], pad_id=ids["pad"]),
        seq_len=seq_len, splits={split: writer.totals for split, writer in writers.items()}, loss_mask=True,
        outputs={split: stage.path(split) for split in SPLITS}, metrics=metrics)

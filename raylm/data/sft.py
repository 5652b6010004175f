"""The `sft-data` stage: chat jsonl -> packed train/val shards with a loss mask, in the tokenize layout.

The driver reads the file once, validating every row (errors name file:line), renders each
conversation with the chat template and holds out a stable `val_fraction` of conversations (by a
hash of the row). Conversations longer than a row are counted rejections. Ray Data then packs whole
conversations into rows and writes parquet shards with `tokens` and `loss_mask`; the manifest has the
same shape as the `tokenize` stage's, so the trainer reads either.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import ray.data
from ray.data.aggregate import Count, Sum

from raylm.data.chat import ChatDataError, chat_token_ids, pack_chat_batch, read_chat_jsonl, render
from raylm.data.curate import split_of
from raylm.data.tokenizer import fingerprint, tokenizer_from_json
from raylm.workspace import StageDir

log = logging.getLogger("raylm")

SPLITS = ("train", "val")
RENDER_CHUNK = 512


def render_splits(path: str, tokenizer_json: str, seq_len: int, val_fraction: float, seed: int,
                  system_prompt: str | None) -> tuple[dict[str, list[dict[str, Any]]], dict[str, int]]:
    tokenizer = tokenizer_from_json(tokenizer_json)
    ids = chat_token_ids(tokenizer)
    splits: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    counts = {"rows": 0, "rejected_too_long": 0}
    for row in read_chat_jsonl(path, system_prompt):
        counts["rows"] += 1
        tokens, mask = render(row.turns, tokenizer, ids)
        if len(tokens) > seq_len + 1:
            counts["rejected_too_long"] += 1
            continue
        split = split_of(json.dumps(row.turns, sort_keys=True), val_fraction, seed)
        splits[split].append({"tokens": tokens, "loss_mask": mask})
    return splits, counts


def sft_data(path: str, tokenizer_json: str, seq_len: int, val_fraction: float, seed: int,
             system_prompt: str | None, stage: StageDir) -> dict[str, Any]:
    splits, counts = render_splits(path, tokenizer_json, seq_len, val_fraction, seed, system_prompt)
    if counts["rejected_too_long"]:
        log.warning("sft-data: %d of %d conversations are longer than seq_len + 1 = %d tokens and were rejected",
                    counts["rejected_too_long"], counts["rows"], seq_len + 1)
    for split in SPLITS:
        if not splits[split]:
            raise ChatDataError(f"{path}: no {split} conversations after holding out finetune.val_fraction = "
                                f"{val_fraction} of {counts['rows']} rows ({counts['rejected_too_long']} too long "
                                f"for seq_len {seq_len}); add rows or change finetune.val_fraction")
    stage.write_text("tokenizer.json", tokenizer_json)
    summary: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        conversations = splits[split]
        dataset = ray.data.from_items(conversations, override_num_blocks=max(1, min(8, len(conversations) // 256)))
        dataset.map_batches(pack_chat_batch, batch_format="pandas", batch_size=1024,
                            fn_kwargs={"tokenizer_json": tokenizer_json, "seq_len": seq_len}) \
            .write_parquet(stage.fs_path(split), filesystem=stage.fs)
        written = ray.data.read_parquet(stage.path(split), columns=["n_tokens", "n_bytes", "n_targets", "n_conversations"])
        totals = written.aggregate(Count(), Sum("n_tokens"), Sum("n_bytes"), Sum("n_targets"), Sum("n_conversations"))
        summary[split] = {"sequences": int(totals["count()"]), "tokens": int(totals["sum(n_tokens)"]),
                          "bytes": int(totals["sum(n_bytes)"]), "targets": int(totals["sum(n_targets)"]),
                          "conversations": int(totals["sum(n_conversations)"])}
        if summary[split]["conversations"] != len(conversations):
            raise RuntimeError(f"packing {split} lost conversations: {len(conversations)} in, "
                               f"{summary[split]['conversations']} written")
    tokenizer = tokenizer_from_json(tokenizer_json)
    ids = chat_token_ids(tokenizer)
    metrics: dict[str, float] = {"rows_input": counts["rows"], "rows_rejected_too_long": counts["rejected_too_long"]}
    for split, figures in summary.items():
        for name, value in figures.items():
            metrics[f"{split}_{name}"] = value
    log.info("sft-data: %d conversations -> %d train / %d val packed rows of %d tokens",
             counts["rows"], summary["train"]["sequences"], summary["val"]["sequences"], seq_len + 1)
    return {
        "metrics": metrics,
        "tokenizer": {"path": stage.path("tokenizer.json"), "fingerprint": fingerprint(tokenizer_json),
                      "vocab_size": tokenizer.get_vocab_size(), "eos_id": ids["eos"], "pad_id": ids["pad"]},
        "seq_len": seq_len,
        "splits": summary,
        "loss_mask": True,
        "outputs": {split: stage.path(split) for split in SPLITS},
    }

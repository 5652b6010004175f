"""The `curate` stage: sources -> cleaned, deduplicated, split documents, with every row accounted for.

Ray Data reads every source, cleans each batch, removes exact duplicates through a hash shuffle and
splits train / val by a hash of the document id. Nothing is dropped: kept rows go to `kept/train` and
`kept/val`, every other row to `rejected/` with its reason, and `input = kept + rejected` is checked
on the written files before the stage is marked finished.
"""

from __future__ import annotations

import logging
from typing import Any

import pandas as pd
import ray.data
import xxhash
from ray.data.aggregate import Count, Sum

from raylm.config import DataConfig
from raylm.data.clean import clean_batch
from raylm.data.dedup import DEDUP_KEY, add_dedup_key, mark_exact_duplicates
from raylm.data.sources import DOC_COLUMNS, read_source
from raylm.workspace import StageDir

log = logging.getLogger("raylm")

KEPT_COLUMNS = ["id", "text", "source", "meta", "n_bytes"]
REJECTED_COLUMNS = ["id", "text", "source", "meta", "reason", "detail", "n_bytes"]
SPLITS = ("train", "val")


class AccountingError(RuntimeError):
    """Rows were lost or invented between the input and the written output."""


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    """`val` for a stable `val_fraction` share of ids, `train` for the rest."""
    bucket = xxhash.xxh64_intdigest(f"{seed}:{doc_id}".encode()) / 2**64
    return "val" if bucket < val_fraction else "train"


def assign_split(batch: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    batch["split"] = batch["id"].map(lambda i: split_of(i, val_fraction, seed))
    return batch


def select_rows(batch: pd.DataFrame, kept: bool, split: str | None = None) -> pd.DataFrame:
    mask = (batch["reason"] == "") if kept else (batch["reason"] != "")
    if split is not None:
        mask &= batch["split"] == split
    return batch.loc[mask, KEPT_COLUMNS if kept else REJECTED_COLUMNS]


def read_all_sources(config: DataConfig) -> ray.data.Dataset:
    parts = [read_source(source, config.num_blocks) for source in config.sources]
    dataset = parts[0]
    for extra in parts[1:]:
        dataset = dataset.union(extra)
    return dataset.select_columns(list(DOC_COLUMNS))


def mark_documents(config: DataConfig) -> ray.data.Dataset:
    """Every input row with its `reason` ('' when kept) and `split`, materialised in the object store."""
    docs = read_all_sources(config)
    docs = docs.map_batches(clean_batch, batch_format="pandas", fn_kwargs={"min_chars": config.min_chars})
    docs = docs.map_batches(add_dedup_key, batch_format="pandas")
    docs = docs.groupby(DEDUP_KEY, num_partitions=shuffle_partitions()).map_groups(
        mark_exact_duplicates, batch_format="pandas")
    docs = docs.map_batches(assign_split, batch_format="pandas",
                            fn_kwargs={"val_fraction": config.val_fraction, "seed": config.seed})
    return docs.materialize()


def shuffle_partitions() -> int:
    """Partitions for shuffles: two per CPU of the cluster (the kept set does not depend on it)."""
    return max(2, min(200, 2 * int(ray.cluster_resources().get("CPU", 1))))


def count_parquet_rows(stage: StageDir, relpath: str) -> int:
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    if stage.fs.get_file_info(stage.fs_path(relpath)).type != pafs.FileType.Directory:
        return 0
    return pads.dataset(stage.fs_path(relpath), filesystem=stage.fs, format="parquet").count_rows()


def reason_table(marked: ray.data.Dataset) -> list[dict[str, Any]]:
    """Rows and bytes per rejection reason ('' = kept): a few rows, safe to bring to the driver."""
    rows = marked.groupby("reason").aggregate(Count(), Sum("n_bytes")).take_all()
    return sorted(({"reason": r["reason"], "rows": int(r["count()"]), "bytes": int(r["sum(n_bytes)"] or 0)}
                   for r in rows), key=lambda r: r["reason"])


def curate(config: DataConfig, stage: StageDir) -> dict[str, Any]:
    marked = mark_documents(config)
    rows_input = marked.count()

    for split in SPLITS:
        marked.map_batches(select_rows, batch_format="pandas", fn_kwargs={"kept": True, "split": split}) \
            .write_parquet(stage.fs_path("kept", split), filesystem=stage.fs)
    marked.map_batches(select_rows, batch_format="pandas", fn_kwargs={"kept": False}) \
        .write_parquet(stage.fs_path("rejected"), filesystem=stage.fs)

    written = {split: count_parquet_rows(stage, f"kept/{split}") for split in SPLITS}
    rejected = count_parquet_rows(stage, "rejected")
    kept = sum(written.values())
    if rows_input != kept + rejected:
        raise AccountingError(f"input rows {rows_input} != kept {kept} + rejected {rejected}")
    if written["train"] == 0:
        raise AccountingError("no document survived curation into the train split; see rejected/ for reasons")

    reasons = reason_table(marked)
    metrics: dict[str, float] = {
        "rows_input": rows_input,
        "rows_kept": kept,
        "rows_rejected": rejected,
        "rows_kept_train": written["train"],
        "rows_kept_val": written["val"],
        "bytes_input": sum(r["bytes"] for r in reasons),
    }
    for row in reasons:
        name = row["reason"] or "kept"
        metrics[f"rows.{name}"] = row["rows"]
        metrics[f"bytes.{name}"] = row["bytes"]
    stage.write_json("stats.json", {"reasons": reasons, "splits": written})
    log.info("curate: %d input rows -> %d kept (%d train, %d val), %d rejected",
             rows_input, kept, written["train"], written["val"], rejected)
    return {
        "metrics": metrics,
        "outputs": {"train": stage.path("kept", "train"), "val": stage.path("kept", "val"),
                    "rejected": stage.path("rejected")},
        "counts": {"input": rows_input, "kept": kept, "rejected": rejected, **written},
    }

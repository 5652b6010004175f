"""The `curate` stage: sources -> cleaned, filtered, redacted, deduplicated, decontaminated, split
documents, with every row accounted for.

The plan, all on Ray Data (the driver lists files and handles small tables only):

    read sources -> screen (too_large, sampled_out by source weight) -> clean -> redact PII
    -> quality filters -> decontaminate -> exact dedup (hash shuffle) -> near dedup (MinHash LSH,
    shuffles on band keys) -> train/val split by a hash of the id

Nothing is dropped: every step marks a row with a `reason` ('' while kept) and a `detail`. Kept
rows go to `kept/train` and `kept/val` (columns id, text, source, meta, n_bytes), every other row to
`rejected/` with its reason, and `input = kept + rejected` is checked on the written files before
the stage is marked finished. Rows and bytes per reason, cleaning and PII counts, cluster sizes and
contamination go to `stats.json`, `stats.png` and MLflow.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pandas as pd
import ray
import ray.data
import xxhash
from ray.data.aggregate import Sum

from raylm import tracking
from raylm.failure import step
from raylm.artifacts import Curated
from raylm.config import DataConfig
from raylm.data import clean, decontam, dedup, pii, quality
from raylm.data.sources import DOC_COLUMNS, empty_files, read_source
from raylm.workspace import StageDir

log = logging.getLogger("raylm")

KEPT_COLUMNS = ["id", "text", "source", "meta", "n_bytes"]
REJECTED_COLUMNS = ["id", "text", "source", "meta", "reason", "detail", "n_bytes"]
SPLITS = ("train", "val")
STAT_COLUMNS = clean.stat_columns() + pii.stat_columns()


class AccountingError(RuntimeError):
    """Rows were lost or invented between the input and the written output."""


def split_of(doc_id: str, val_fraction: float, seed: int) -> str:
    """`val` for a stable `val_fraction` share of ids, `train` for the rest."""
    bucket = xxhash.xxh64_intdigest(f"{seed}:{doc_id}".encode()) / 2**64
    return "val" if bucket < val_fraction else "train"


def assign_split(batch: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    batch["split"] = batch["id"].map(lambda i: split_of(i, val_fraction, seed))
    return batch


def screen_batch(batch: pd.DataFrame, max_doc_bytes: int, weights: dict[str, float], seed: int) -> pd.DataFrame:
    """Reject documents over `max_doc_bytes` (their text is not kept) and sample sources whose weight
    is below 1 down to that share, by a stable hash of the id; a weight above 1 goes into `meta`."""
    live = batch["reason"] == ""
    large = live & (batch["n_bytes"] > max_doc_bytes)
    if large.any():
        batch.loc[large, "detail"] = batch.loc[large, "n_bytes"].map(lambda n: f"{n} bytes > data.max_doc_bytes = {max_doc_bytes}")
        batch.loc[large, "reason"] = "too_large"
        batch.loc[large, "text"] = ""
    for label, weight in weights.items():
        if weight == 1.0:
            continue
        mine = (batch["reason"] == "") & (batch["source"] == label)
        if weight < 1.0:
            drawn = batch.loc[mine, "id"].map(lambda i: xxhash.xxh64_intdigest(f"w{seed}:{i}".encode()) / 2**64)
            out = drawn.index[drawn >= weight]
            batch.loc[out, "reason"] = "sampled_out"
            batch.loc[out, "detail"] = f"source {label!r} has weight {weight}"
        else:
            batch.loc[mine, "meta"] = batch.loc[mine, "meta"].map(
                lambda m: json.dumps({**json.loads(m), "weight": weight}, sort_keys=True))
    return batch


def select_rows(batch: pd.DataFrame, kept: bool, split: str | None = None) -> pd.DataFrame:
    mask = (batch["reason"] == "") if kept else (batch["reason"] != "")
    if split is not None:
        mask &= batch["split"] == split
    rows = batch.loc[mask, KEPT_COLUMNS if kept else REJECTED_COLUMNS].copy()
    if kept:  # kept rows carry the size of the text they hold; rejects keep their input size
        rows["n_bytes"] = rows["text"].map(lambda t: len(t.encode("utf-8", "surrogatepass"))).astype("int64")
    return rows


def read_all_sources(config: DataConfig) -> ray.data.Dataset:
    parts = [read_source(source, config.num_blocks).select_columns(list(DOC_COLUMNS)) for source in config.sources]
    dataset = parts[0]
    for extra in parts[1:]:
        dataset = dataset.union(extra)
    return dataset


def shuffle_partitions() -> int:
    """Partitions for shuffles: two per CPU of the cluster (the kept set does not depend on it)."""
    return max(2, min(200, 2 * int(ray.cluster_resources().get("CPU", 1))))


def mark_documents(config: DataConfig) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Every input row with its `reason` ('' when kept) and `split`, materialised; and step statistics."""
    partitions = shuffle_partitions()
    docs = read_all_sources(config)
    weights = {source.label: source.weight for source in config.sources}
    docs = docs.map_batches(screen_batch, batch_format="pandas",
                            fn_kwargs={"max_doc_bytes": config.max_doc_bytes, "weights": weights, "seed": config.seed})
    docs = docs.map_batches(clean.clean_batch, batch_format="pandas",
                            fn_kwargs={"min_chars": config.min_chars, "config": config.clean})
    docs = docs.map_batches(pii.pii_batch, batch_format="pandas",
                            fn_kwargs={"types": list(config.pii.types), "enabled": config.pii.enabled,
                                       "phone_region": config.pii.phone_region})
    docs = docs.map_batches(quality.quality_batch, batch_format="pandas", fn_kwargs={"config": config.quality})
    stats: dict[str, Any] = {"empty_files": {"count": 0, "files": []}}
    for source in config.sources:  # files without a byte give no row; say so here
        found = empty_files(source)
        stats["empty_files"]["count"] += found["count"]
        stats["empty_files"]["files"] += found["files"]
    if stats["empty_files"]["count"]:
        log.info("curate: %d empty file(s) gave no row: %s", stats["empty_files"]["count"],
                 ", ".join(stats["empty_files"]["files"]))
    if config.decontam.benchmarks:
        index = decontam.build_benchmark_ngrams(config.decontam.benchmarks, config.decontam.ngram, config.decontam.tasks)
        stats["decontam"] = {"tasks": index.tasks, "benchmark_ngrams": int(len(index.hashes)), "ngram": index.ngram}
        docs = docs.map_batches(decontam.decontam_batch, batch_format="pandas",
                                fn_kwargs={"index_ref": [ray.put(index)], "mode": config.decontam.mode})
    with step("read, clean and filter") as shown:
        docs = docs.materialize()
        shown["rows"] = docs.count()  # from the materialised blocks' metadata
        shown["bytes"] = (docs.sum("n_bytes") or 0) if shown["rows"] else 0
    handled = dict(shown)  # what each later step goes through
    if docs.count() == 0:  # from the materialised blocks' metadata;  # only empty files: no step below has anything to do (a shuffle of nothing has no schema)
        return docs, stats
    if config.dedup.exact:
        with step("exact dedup") as shown:
            shown.update(handled)
            docs = docs.map_batches(dedup.add_dedup_key, batch_format="pandas")
            docs = docs.groupby(dedup.DEDUP_KEY, num_partitions=partitions).map_groups(
                dedup.mark_exact_duplicates, batch_format="pandas").drop_columns([dedup.DEDUP_KEY]).materialize()
    if config.dedup.near:
        with step("near dedup") as shown:
            shown.update(handled)
            docs, stats["near_dedup"] = dedup.near_dedup(docs, config.dedup, partitions)
    with step("train/val split"):
        docs = docs.map_batches(assign_split, batch_format="pandas",
                                fn_kwargs={"val_fraction": config.val_fraction, "seed": config.seed})
        return docs.materialize(), stats


def write_rows(rows: ray.data.Dataset, stage: StageDir, relpath: str, columns: list[str]) -> None:
    """Write `rows` as parquet under `relpath`; with no row, one empty file with the columns, so that
    the folder is always a readable (empty) dataset."""
    # deferred: pulls in pyarrow, slow to import; only this path needs it
    import pyarrow as pa
    import pyarrow.parquet as pq

    with step(f"write {relpath}"):
        rows.write_parquet(stage.fs_path(relpath), filesystem=stage.fs)
    if count_parquet_rows(stage, relpath) == 0:
        schema = pa.schema([(c, pa.int64() if c == "n_bytes" else pa.string()) for c in columns])
        stage.fs.create_dir(stage.fs_path(relpath))
        pq.write_table(schema.empty_table(), stage.fs_path(relpath, "empty.parquet"), filesystem=stage.fs)


def count_parquet_rows(stage: StageDir, relpath: str) -> int:
    # deferred: pulls in pyarrow, slow to import; only this path needs it
    import pyarrow.dataset as pads
    import pyarrow.fs as pafs

    if stage.fs.get_file_info(stage.fs_path(relpath)).type != pafs.FileType.Directory:
        return 0
    return pads.dataset(stage.fs_path(relpath), filesystem=stage.fs, format="parquet").count_rows()


def count_reasons(batch: pd.DataFrame) -> pd.DataFrame:
    """Rows and input bytes per reason in one block."""
    grouped = batch.groupby("reason", sort=True)["n_bytes"].agg(["count", "sum"]).reset_index()
    return pd.DataFrame({"reason": grouped["reason"].astype(str), "rows": grouped["count"].astype("int64"),
                         "bytes": grouped["sum"].astype("int64")})


def reason_table(marked: ray.data.Dataset) -> list[dict[str, Any]]:
    """Rows and bytes per rejection reason ('' = kept), summed over per-block counts: a few rows per
    block reach the driver, and no shuffle is needed."""
    totals: dict[str, list[int]] = {}
    for batch in marked.map_batches(count_reasons, batch_format="pandas").iter_batches(batch_format="pandas"):
        for reason, rows, size in zip(batch["reason"], batch["rows"], batch["bytes"]):
            entry = totals.setdefault(reason, [0, 0])
            entry[0] += int(rows)
            entry[1] += int(size)
    return [{"reason": reason, "rows": rows, "bytes": size} for reason, (rows, size) in sorted(totals.items())]


def step_totals(marked: ray.data.Dataset) -> dict[str, int]:
    """Sums of the per-row cleaning and PII counters (one small row on the driver)."""
    present = [c for c in STAT_COLUMNS if c in marked.columns()]
    totals = marked.aggregate(*[Sum(c) for c in present])
    return {c: int(totals.get(f"sum({c})") or 0) for c in present}


def contamination_index(marked: ray.data.Dataset, stats: dict[str, Any], stage: StageDir) -> str:
    """Write `contamination.json` (task -> contaminated item ids) and return its path."""
    info = stats["decontam"]
    items: set[str] = set()
    flagged = marked.filter(expr="contam_items != ''").select_columns(["contam_items"]).materialize()
    for batch in flagged.map_batches(decontam.contaminated_item_rows, batch_format="pandas").iter_batches(
            batch_format="pandas"):  # (document, item) rows of contaminated documents only
        items.update(batch["item_id"])
    documents = flagged.count()
    index = decontam.write_index(sorted(items), info["tasks"], info["ngram"], documents)
    stage.write_json("contamination.json", index)
    info["contaminated_documents"] = documents
    info["contaminated_items"] = {task: len(ids) for task, ids in index["tasks"].items() if ids}
    return stage.path("contamination.json")


def metric_name(name: str) -> str:
    return name.replace(":", ".")


def plot_stats(reasons: list[dict[str, Any]], pii_counts: dict[str, int]) -> bytes:
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib.pyplot as plt

    labels = [r["reason"] or "kept" for r in reasons]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].barh(labels, [r["rows"] for r in reasons])
    axes[0].set_title("rows per outcome")
    axes[1].barh(labels, [r["bytes"] / 1e6 for r in reasons])
    axes[1].set_title("input MB per outcome")
    axes[2].barh(list(pii_counts) or ["none"], list(pii_counts.values()) or [0])
    axes[2].set_title("PII redactions per type")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def curate(config: DataConfig, stage: StageDir) -> Curated:
    marked, stats = mark_documents(config)
    rows_input = marked.count()

    for split in SPLITS:
        write_rows(marked.map_batches(select_rows, batch_format="pandas", fn_kwargs={"kept": True, "split": split}),
                   stage, f"kept/{split}", KEPT_COLUMNS)
    write_rows(marked.map_batches(select_rows, batch_format="pandas", fn_kwargs={"kept": False}),
               stage, "rejected", REJECTED_COLUMNS)

    written = {split: count_parquet_rows(stage, f"kept/{split}") for split in SPLITS}
    rejected = count_parquet_rows(stage, "rejected")
    kept = sum(written.values())
    log.info("curate: accounting: input %d = kept %d + rejected %d: %s", rows_input, kept, rejected,
             "holds" if rows_input == kept + rejected else "BROKEN")
    with step("accounting"):
        if rows_input != kept + rejected:
            raise AccountingError(f"input rows {rows_input} != kept {kept} + rejected {rejected}")
        if written["train"] == 0:
            raise AccountingError("no document survived curation into the train split; see rejected/ for reasons "
                                  f"({stage.path('rejected')})")

    reasons = reason_table(marked)
    totals = step_totals(marked)
    outputs = {"train": stage.path("kept", "train"), "val": stage.path("kept", "val"),
               "rejected": stage.path("rejected")}
    if "decontam" in stats:
        outputs["contamination"] = contamination_index(marked, stats, stage)

    metrics: dict[str, float] = {
        "rows_input": rows_input,
        "rows_kept": kept,
        "rows_rejected": rejected,
        "rows_kept_train": written["train"],
        "rows_kept_val": written["val"],
        "bytes_input": sum(r["bytes"] for r in reasons),
        "accounting_ok": 1,
        "files_empty": stats["empty_files"]["count"],
    }
    for row in reasons:
        name = metric_name(row["reason"] or "kept")
        metrics[f"rows.{name}"] = row["rows"]
        metrics[f"bytes.{name}"] = row["bytes"]
    pii_counts = {c.removeprefix("stat_pii_"): v for c, v in totals.items() if c.startswith("stat_pii_")}
    cleaning = {c.removeprefix("stat_clean_"): v for c, v in totals.items() if c.startswith("stat_clean_")}
    metrics.update({f"pii.{kind}": count for kind, count in pii_counts.items()})
    metrics.update({f"clean.{name}": count for name, count in cleaning.items()})
    near = stats.get("near_dedup")
    if near:
        metrics.update({"near_dup.pairs": near["pairs"], "near_dup.clusters": near["clusters"],
                        "near_dup.bands": near["bands"], "near_dup.rows_per_band": near["rows_per_band"]})
    if "decontam" in stats:
        metrics["contaminated_documents"] = stats["decontam"]["contaminated_documents"]

    summary = {"accounting": {"input": rows_input, "kept": kept, "rejected": rejected,
                              "holds": rows_input == kept + rejected},
               "reasons": reasons, "splits": written, "pii": pii_counts, "cleaning": cleaning, **stats}
    stage.write_json("stats.json", summary)
    png = plot_stats(reasons, pii_counts)
    with stage.fs.open_output_stream(stage.fs_path("stats.png")) as out:
        out.write(png)
    _log_artifacts(summary, png)
    log.info("curate: %d input rows -> %d kept (%d train, %d val), %d rejected; reasons %s",
             rows_input, kept, written["train"], written["val"], rejected,
             {r["reason"] or "kept": r["rows"] for r in reasons})
    return Curated(outputs=outputs, counts={"input": rows_input, "kept": kept, "rejected": rejected, **written},
                   metrics=metrics)


def _log_artifacts(summary: dict[str, Any], png: bytes) -> None:
    tracking.log_dict(summary, "curate/stats.json")
    tracking.log_files({"stats.png": png}, "curate")

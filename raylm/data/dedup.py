"""Exact deduplication, one group at a time.

Rows are keyed by a stable hash of their cleaned text (xxhash: Python's `hash()` differs between
worker processes), grouped by Ray Data's hash shuffle, and each group keeps the row with the
smallest id. The result does not depend on how rows were split into blocks or workers.
"""

from __future__ import annotations

import pandas as pd
import xxhash

DEDUP_KEY = "dedup_key"


def text_key(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(text.encode("utf-8", "surrogatepass"))


def add_dedup_key(batch: pd.DataFrame) -> pd.DataFrame:
    """Key live rows by their text; rejected rows get their own id so they never group together."""
    live = batch["reason"] == ""
    batch[DEDUP_KEY] = batch["id"].map(lambda i: f"rejected:{i}")
    batch.loc[live, DEDUP_KEY] = batch.loc[live, "text"].map(text_key)
    return batch


def mark_exact_duplicates(group: pd.DataFrame) -> pd.DataFrame:
    """Within one key group, keep the live row with the smallest id; mark the rest `exact_dup`."""
    live = group.index[group["reason"] == ""]
    if len(live) > 1:
        ordered = group.loc[live].sort_values("id", kind="stable")
        keeper = ordered["id"].iloc[0]
        duplicates = ordered.index[1:]
        group.loc[duplicates, "reason"] = "exact_dup"
        group.loc[duplicates, "detail"] = f"duplicate of {keeper}"
    return group

"""Benchmark decontamination: training documents that share a long word n-gram with a benchmark item.

The benchmark items come from `raylm.data.benchmarks` (the same readers and item ids evaluation
uses, `<task>/<index>`). Their n-grams (13 words by default, lower case, as in GPT-3's and
Llama's decontamination) are hashed into one sorted array with the item each came from; the array
travels to the workers through the object store, and each batch of documents looks its own n-gram
hashes up with `searchsorted`. A document that shares an n-gram is rejected as `contaminated` (or,
with `mode: flag`, kept with the items listed in its `meta`).

The stage writes `contamination.json`: for every task checked, the ids of its contaminated items.
`load_contamination_index(path)` reads it back for evaluation, which reports scores on all items and
on clean items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from raylm.data.benchmarks import iter_benchmark_items
from raylm.data.ngrams import ngram_hashes
from raylm.data.frames import python_strings

MAX_DETAIL_ITEMS = 10


@dataclass
class BenchmarkNgrams:
    """Sorted n-gram hashes of benchmark items and, aligned, the index of the item each came from."""

    hashes: np.ndarray
    items: np.ndarray
    item_ids: list[str]
    tasks: list[str]
    ngram: int

    def matches(self, doc_hashes: np.ndarray) -> list[str]:
        """Ids of the items sharing at least one n-gram hash with a document, in sorted order."""
        if not len(doc_hashes) or not len(self.hashes):
            return []
        unique = np.unique(doc_hashes)
        left = np.searchsorted(self.hashes, unique, side="left")
        right = np.searchsorted(self.hashes, unique, side="right")
        found = right > left
        if not found.any():
            return []
        hit_items: set[int] = set()
        for lo, hi in zip(left[found], right[found]):
            hit_items.update(self.items[lo:hi].tolist())
        return sorted(self.item_ids[i] for i in hit_items)


def build_benchmark_ngrams(root: str, ngram: int = 13, tasks: list[str] | None = None) -> BenchmarkNgrams:
    """Hash every n-gram of every benchmark item under `root` (items shorter than n words give none)."""
    items = list(iter_benchmark_items(root, tasks))
    if not items:
        raise FileNotFoundError(f"data.decontam.benchmarks = {root!r}: no benchmark files found there")
    hashes, offsets = ngram_hashes([item.text for item in items], ngram, short_docs=False)
    owners = np.repeat(np.arange(len(items), dtype=np.int64), np.diff(offsets))
    order = np.argsort(hashes, kind="stable")
    found_tasks = sorted({item.task for item in items})
    return BenchmarkNgrams(hashes[order], owners[order], [item.item_id for item in items], found_tasks, ngram)


def decontam_batch(batch: pd.DataFrame, index_ref: list[Any], mode: str) -> pd.DataFrame:
    """Mark (or flag) live rows sharing an n-gram with a benchmark item; list the items in `contam_items`.

    `index_ref` is `[ObjectRef]` (a bare ref in `fn_kwargs` would not be resolved) or `[BenchmarkNgrams]`.
    """
    batch = python_strings(batch)
    index = index_ref[0]
    if not isinstance(index, BenchmarkNgrams):
        # deferred: pulls in ray, slow to import; only this path needs it
        import ray

        index = ray.get(index)
    batch["contam_items"] = ""
    live = batch.index[batch["reason"] == ""]
    if not len(live):
        return batch
    hashes, offsets = ngram_hashes(batch.loc[live, "text"].tolist(), index.ngram, short_docs=False)
    for position, row in enumerate(live):
        found = index.matches(hashes[offsets[position]:offsets[position + 1]])
        if not found:
            continue
        batch.at[row, "contam_items"] = json.dumps(found)
        shown = ", ".join(found[:MAX_DETAIL_ITEMS]) + (f" and {len(found) - MAX_DETAIL_ITEMS} more"
                                                         if len(found) > MAX_DETAIL_ITEMS else "")
        if mode == "drop":
            batch.at[row, "reason"] = "contaminated"
            batch.at[row, "detail"] = f"shares a {index.ngram}-gram with {shown}"
        else:
            meta = json.loads(batch.at[row, "meta"])
            meta["contaminated_with"] = found
            batch.at[row, "meta"] = json.dumps(meta, sort_keys=True)
    return batch


def contaminated_item_rows(batch: pd.DataFrame) -> pd.DataFrame:
    """One `item_id` row per (document, contaminated item)."""
    items = [item for listed in batch["contam_items"] if listed for item in json.loads(listed)]
    return pd.DataFrame({"item_id": pd.Series(items, dtype=object)})


def write_index(items: list[str], tasks: list[str], ngram: int, documents: int) -> dict[str, Any]:
    by_task: dict[str, list[str]] = {task: [] for task in tasks}
    for item in sorted(set(items), key=lambda i: (i.rsplit("/", 1)[0], int(i.rsplit("/", 1)[1]))):
        by_task.setdefault(item.rsplit("/", 1)[0], []).append(item)
    return {"ngram": ngram, "contaminated_documents": documents, "tasks": by_task}


def load_contamination_index(path: str) -> dict[str, set[str]]:
    """Task name -> ids (`<task>/<index>`) of its contaminated items; every task checked is present."""
    # deferred: pulls in pyarrow, slow to import; only this path needs it
    from raylm.workspace import read_text_uri

    data = json.loads(read_text_uri(path))
    return {task: set(ids) for task, ids in data["tasks"].items()}

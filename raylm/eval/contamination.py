"""Contamination-aware scores: every benchmark's score on all items and on clean items only.

Curation's decontamination index says which benchmark items overlap the training corpus, as
`{task: {item_id, ...}}` with item ids `<task>/<index>` from `raylm.data.benchmarks`. Converted
benchmark documents carry the same id (`raylm_id`), so each lm-eval per-sample record can be
classed clean or contaminated and the task's metrics recomputed on the clean ones (every suite
metric aggregates by mean, so the clean score is the mean over clean samples).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Iterable

SAMPLE_SKIP = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
               "prompt_hash", "target_hash"}


def load_index(path: str | os.PathLike) -> dict[str, set[str]]:
    """The decontamination index: curation's loader when present, else a tolerant reader of its format.

    curation writes `{"ngram", "contaminated_documents", "tasks": {task: [item ids]}}`; a task it
    does not list was not checked. Also accepted: a JSON object `{task: [item ids]}` (optionally under a `"tasks"` or `"contaminated"`
    key), a JSON list of item ids, or JSON lines `{"task", "item_id"}` / `{"item_id"}`; an item id's
    task is the part before its last `/` when no task is given.
    """
    try:
        # deferred: pulls in pandas, slow to import; only this path needs it
        from raylm.data.decontam import load_contamination_index
    except ImportError:
        load_contamination_index = None
    if load_contamination_index is not None:
        try:
            return {task: set(ids) for task, ids in load_contamination_index(str(path)).items()}
        except (KeyError, TypeError, AttributeError, ValueError):
            pass  # another layout of the same information: read it below
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    data.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error}): {line[:80]!r}") from error
    if isinstance(data, dict):
        data = data.get("tasks", data.get("contaminated", data))
    index: dict[str, set[str]] = defaultdict(set)
    if isinstance(data, dict):
        for task, ids in data.items():
            if isinstance(ids, dict):
                ids = [key for key, value in ids.items() if value] if not any(isinstance(v, (list, dict)) for v in ids.values()) else list(ids)
            index[task].update(str(i) for i in ids)
        return dict(index)
    for number, entry in enumerate(data, start=1):
        item_id = entry if isinstance(entry, str) else entry.get("item_id") or entry.get("id")
        if not item_id:
            raise ValueError(f"{path}: entry {number} has no item_id: {entry!r}")
        task = entry.get("task") if isinstance(entry, dict) and entry.get("task") else item_id.rsplit("/", 1)[0]
        index[task].add(str(item_id))
    return dict(index)


def is_contaminated(item_id: str | None, index: dict[str, set[str]]) -> bool:
    if not item_id:
        return False
    return item_id in index.get(item_id.rsplit("/", 1)[0], ()) or any(item_id in ids for ids in index.values())


def _metric_values(sample: dict[str, Any]) -> dict[str, float]:
    values = {}
    for key, value in sample.items():
        if key in SAMPLE_SKIP:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        values[f"{key},{sample.get('filter', 'none')}"] = number
    return values


# A sample's value is not always the metric itself: lm-eval's `perplexity` sample is a log-likelihood,
# aggregated as exp(-mean) (its `perplexity` aggregation).
AGGREGATE = {"perplexity": lambda mean_loglikelihood: math.exp(-mean_loglikelihood)}


def split_scores(samples: Iterable[dict[str, Any]], index: dict[str, set[str]] | None) -> dict[str, Any]:
    """Per metric (`metric,filter`): mean over all samples and over clean ones, with the counts."""
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0.0, 0])
    ids_all, ids_dirty = set(), set()
    for sample in samples:
        item_id = (sample.get("doc") or {}).get("raylm_id")
        dirty = bool(index) and is_contaminated(item_id, index)
        ids_all.add(item_id if item_id else id(sample))
        if dirty:
            ids_dirty.add(item_id)
        for key, value in _metric_values(sample).items():
            acc = sums[key]
            acc[0] += value
            acc[1] += 1
            if not dirty:
                acc[2] += value
                acc[3] += 1
    # A task the index does not list was not checked: its clean score is unknown, not "all items".
    checked = bool(index) and any(isinstance(i, str) and i.rsplit("/", 1)[0] in index for i in ids_all)
    out: dict[str, Any] = {"n_items": len(ids_all), "n_contaminated": len(ids_dirty) if checked else None,
                           "n_clean": len(ids_all) - len(ids_dirty) if checked else None, "checked": checked,
                           "metrics": {}}
    for key, (total, count, clean_total, clean_count) in sums.items():
        aggregate = AGGREGATE.get(key.split(",")[0], lambda mean: mean)
        out["metrics"][key] = {"all": aggregate(total / count) if count else math.nan,
                               "clean": aggregate(clean_total / clean_count) if clean_count and checked else math.nan}
    return out

"""Exact and near (MinHash LSH) deduplication: per-batch functions and their Ray Data plan.

Exact: rows are keyed by a stable hash (xxhash; Python's `hash()` differs between worker processes)
of their normalised text (Unicode NFKC, lower case, whitespace collapsed), grouped by a Ray Data hash
shuffle, and each group keeps the row with the smallest id.

Near: MinHash signatures over word n-gram shingles (`raylm.data.minhash`: one-permutation hashing with
optimal densification, a whole batch per numpy call), then locality-sensitive hashing with the band
count and rows per band from `datasketch`'s optimal-parameter rule, then a check of each candidate
pair (`dedup.verify`). Ray Data does the rest, so no step holds the corpus, its signatures or its
shingles on the driver:

1. `map_batches(signature_batch)`: `id, signature` (num_perm uint32, 4*num_perm bytes per document);
2. `map_batches(band_rows)`: one `shard, band_key, id, signature` row per band, `shard = band_key %
   SHARDS` (1024);
3. `groupby(shard).map_groups(shard_pairs)` (a hash shuffle; all rows of a band key land in the same
   shard): the candidate pairs of each bucket (a run of equal band keys after a sort by band key and
   id), a < b, with their signature similarity. Grouping by shard rather than by band key calls the
   function 1,024 times instead of once per band key (~20 per document), which took ~20 s per 1,000
   documents in pandas overhead alone. Pairs under `threshold` are dropped when
   `verify: signature`, those under `threshold - EXACT_PREFILTER_MARGIN` (0.15, ~4 standard deviations
   of a 128-value estimate) when `verify: exact`;
4. the driver collects the distinct candidate pairs; with `verify: exact` (the default) they go
   through `raylm.data.exact_jaccard`: one more hash shuffle, keyed by pair, of the candidate
   documents' sorted shingle hashes, keeping the pairs whose true Jaccard reaches the threshold.
   Signature estimates have an RMSE of ~0.036 around 0.8, so `signature` lets through pairs just
   under the threshold (precision ~0.9 on the benchmark); `exact` has precision 1 on its candidates
   and costs one shuffle of the candidates' shingles only;
5. connected components of the pairs on the driver (union-find over near-duplicate pairs only: its
   memory grows with the number of near duplicates, not with the corpus), the smallest id of each
   component kept;
6. `map_batches(mark_near_duplicates)` with the `duplicate id -> kept id` table in the object store.

Signatures travel with the band rows so that the signature check needs no join (each Ray Data
shuffle starts its own aggregator actors, which dominates small runs).

The kept set is a function of the documents alone: signatures and shingles depend only on a
document's text, buckets are sorted by id, and components keep their smallest id, so neither the
number of blocks nor the number of workers changes it.

Memory per GB of text (documents of ~2 KB, so ~500k of them; 128 values; b bands: b=20 by default,
aimed at 0.7 for exact verification, b=14 with `verify: signature`): signatures 512 B/doc = 0.26 GB;
band rows b * ~550 B/doc = 5.1 GB (3.6 GB at b=14) streamed through the shard shuffle (Ray Data
spills it to disk; each worker holds one block, 128 MiB by default, plus its shuffle partitions'
buffers); exact verification streams 8 B per shingle (~1.5 GB per GB of text) of each candidate
document once per pair it is in, so ~1.5 GB times the near-duplicate share of the corpus (0.3 GB
when 20% of it has a candidate), and nothing for other documents; the candidate pairs, the
`id -> pair numbers` table and the `id -> kept id` table, ~60-100 B per candidate pair, are what the
driver and each task hold.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import xxhash

from raylm.data.exact_jaccard import verify_pairs_exactly
from raylm.data.minhash import EMPTY as _EMPTY
from raylm.data.minhash import signature_similarity, signatures
from raylm.data.shards import SHARDS, from_holder

DEDUP_KEY = "dedup_key"
_BAND_MULTIPLIER = np.uint64(0x100000001B3)
_SPACES = re.compile(r"\s+")


# ----------------------------------------------------------------------------------------------
# Exact


def normalise_for_exact(text: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).lower()).strip()


def text_key(text: str) -> str:
    return xxhash.xxh3_128_hexdigest(normalise_for_exact(text).encode("utf-8", "surrogatepass"))


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


# ----------------------------------------------------------------------------------------------
# MinHash signatures


def lsh_parameters(threshold: float, num_perm: int, false_negative_weight: float = 0.5) -> tuple[int, int]:
    """(bands, rows per band) from datasketch's optimal-parameter rule."""
    # deferred: pulls in datasketch, slow to import; only this path needs it
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, 1.0 - false_negative_weight, false_negative_weight)


# ----------------------------------------------------------------------------------------------
# Per-batch functions of the Ray Data plan


def signature_batch(batch: pa.Table, num_perm: int, shingle_size: int, seed: int) -> pa.Table:
    """`id, signature` (fixed-size binary, 4*num_perm bytes) of a pyarrow batch with `id, text`: arrow
    in and out, so no pandas conversion of the text and no Python object per signature."""
    sigs = np.ascontiguousarray(signatures(batch.column("text").to_pylist(), num_perm, shingle_size, seed))
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * num_perm), len(sigs), [None, pa.py_buffer(sigs)])
    return pa.table({"id": batch.column("id"), "signature": column})


def band_keys(sigs: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 63-bit key per (document, band): a hash of the band's values and the band number."""
    keys = np.zeros((len(sigs), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            key = np.full(len(sigs), np.uint64(band + 1) * np.uint64(0x9E3779B97F4A7C15), dtype=np.uint64)
            for value in sigs[:, band * rows:(band + 1) * rows].T:
                key = (key ^ value.astype(np.uint64)) * _BAND_MULTIPLIER
            keys[:, band] = key
    return (keys >> np.uint64(1)).astype(np.int64)


def band_rows(batch: pd.DataFrame, num_perm: int, bands: int, rows: int) -> pd.DataFrame:
    """`shard, band_key, id, signature` for every band of every document that has shingles."""
    if not len(batch):
        return pd.DataFrame({"shard": np.zeros(0, np.int64), "band_key": np.zeros(0, np.int64),
                             "id": np.zeros(0, object), "signature": np.zeros(0, object)})
    sigs = np.frombuffer(b"".join(batch["signature"]), dtype=np.uint32).reshape(len(batch), num_perm)
    has_shingles = ~(sigs == _EMPTY).all(axis=1)
    keys = band_keys(sigs[has_shingles], bands, rows)
    ids = batch["id"].to_numpy()[has_shingles]
    signature_bytes = batch["signature"].to_numpy()[has_shingles]
    flat_keys = keys.reshape(-1)
    return pd.DataFrame({"shard": flat_keys % SHARDS, "band_key": flat_keys, "id": np.repeat(ids, bands),
                         "signature": np.repeat(signature_bytes, bands)})


def pair_indices(size: int, max_bucket: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of a bucket of `size` members sorted by id, i below `max_bucket`."""
    firsts, seconds = np.triu_indices(size, 1)
    keep = firsts < max_bucket
    return firsts[keep], seconds[keep]


def shard_pairs(group: pd.DataFrame, max_bucket: int, num_perm: int | None = None,
                threshold: float = 0.0, verify: bool = False) -> pd.DataFrame:
    """Candidate pairs `(a, b, similarity)`, a < b, of every bucket (band key) in one shard, those below
    the threshold dropped when verifying: the buckets are runs of a sort by (band_key, id), and all the
    pairs' signature similarities are computed in one numpy call."""
    members = group.drop_duplicates(["band_key", "id"]).sort_values(["band_key", "id"], kind="stable")
    keys = members["band_key"].to_numpy()
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else np.zeros(0, np.int64)
    sizes = np.diff(np.r_[starts, len(keys)])
    firsts, seconds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1]):
        first, second = pair_indices(int(size), max_bucket)
        firsts.append(first + start)
        seconds.append(second + start)
    first_idx, second_idx = np.concatenate(firsts), np.concatenate(seconds)
    similarity = np.ones(len(first_idx))
    if num_perm is not None and len(first_idx) and "signature" in members:
        sigs = np.frombuffer(b"".join(members["signature"]), dtype=np.uint32).reshape(len(members), num_perm)
        similarity = signature_similarity(sigs[first_idx], sigs[second_idx])
    keep = similarity >= threshold if verify else np.ones(len(first_idx), dtype=bool)
    ids = members["id"].to_numpy(dtype=object)
    return pd.DataFrame({"a": pd.Series(ids[first_idx[keep]], dtype=object),
                         "b": pd.Series(ids[second_idx[keep]], dtype=object),
                         "similarity": similarity[keep].astype(float)})


class Components:
    """Union-find over document ids whose root is always the smallest id of its component."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        parent = self.parent.setdefault(item, item)
        if parent != item:
            root = self.find(parent)
            self.parent[item] = root
            return root
        return item

    def union(self, a: str, b: str) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            low, high = sorted((root_a, root_b))
            self.parent[high] = low

    def duplicates(self) -> dict[str, str]:
        """Every non-root member -> the root (smallest id) of its component."""
        return {item: root for item in self.parent if (root := self.find(item)) != item}

    def sizes(self) -> list[int]:
        counts: dict[str, int] = {}
        for item in self.parent:
            root = self.find(item)
            counts[root] = counts.get(root, 0) + 1
        return sorted(counts.values(), reverse=True)


def mark_near_duplicates(batch: pd.DataFrame, keepers_ref: list[Any]) -> pd.DataFrame:
    """Mark live rows found in the `id -> kept id` table (`[ObjectRef]` or `[dict]`) as `near_dup`."""
    keepers = from_holder(keepers_ref)
    keeper = batch["id"].map(lambda i: keepers.get(i, ""))
    hit = (batch["reason"] == "") & (keeper != "")
    batch.loc[hit, "reason"] = "near_dup"
    batch.loc[hit, "detail"] = "near duplicate of " + keeper[hit]
    return batch


# ----------------------------------------------------------------------------------------------
# The Ray Data plan


VERIFY_MODES = ("exact", "signature", "none")
EXACT_PREFILTER_MARGIN = 0.15  # ~4 standard deviations of a 128-value estimate at J = 0.8
# with exact verification LSH only proposes candidates, so its bands aim this much under the threshold:
# at 0.8 / 128 values / weight 0.9, 20 bands of 6 rows instead of 14 of 9, and a pair at J = 0.8 is a
# candidate with probability 0.998 instead of 0.87 (the benchmark lost 2 of 80 true pairs, J = 0.86
# with estimates 0.78-0.79, to 14x9)
EXACT_LSH_MARGIN = 0.1


def verify_mode(verify: bool | str) -> str:
    """`exact`, `signature` or `none`; the booleans of older configs mean `signature` and `none`."""
    if isinstance(verify, bool):
        return "signature" if verify else "none"
    if verify not in VERIFY_MODES:
        raise ValueError(f"dedup.verify must be one of {VERIFY_MODES}, got {verify!r}")
    return verify


def candidate_pairs(live: Any, num_perm: int, shingle_size: int, lsh_threshold: float, seed: int,
                    false_negative_weight: float, min_similarity: float | None, max_bucket: int,
                    num_partitions: int) -> tuple[Any, dict[str, Any]]:
    """LSH candidate pairs `(a, b, similarity)` of a Ray Dataset with `id, text` columns, with bands
    chosen for `lsh_threshold`, those whose signature similarity is under `min_similarity` dropped
    (None: none dropped). A pair found in several bands appears several times."""
    bands, rows = lsh_parameters(lsh_threshold, num_perm, false_negative_weight)
    sigs = live.map_batches(signature_batch, batch_format="pyarrow",
                            fn_kwargs={"num_perm": num_perm, "shingle_size": shingle_size, "seed": seed})
    keyed = sigs.map_batches(band_rows, batch_format="pandas",
                             fn_kwargs={"num_perm": num_perm, "bands": bands, "rows": rows})
    pairs = keyed.groupby("shard", num_partitions=num_partitions).map_groups(
        shard_pairs, batch_format="pandas",
        fn_kwargs={"max_bucket": max_bucket, "num_perm": num_perm, "threshold": min_similarity or 0.0,
                   "verify": min_similarity is not None})
    return pairs, {"bands": bands, "rows_per_band": rows}


def _collect_pairs(pairs: Any) -> set[tuple[str, str]]:
    return {(a, b) for batch in pairs.iter_batches(batch_format="pandas", batch_size=65536)
            for a, b in zip(batch["a"], batch["b"])}


def near_duplicate_pairs(live: Any, num_perm: int, shingle_size: int, threshold: float, seed: int,
                         false_negative_weight: float, verify: bool | str, max_bucket: int,
                         num_partitions: int) -> tuple[set[tuple[str, str]], dict[str, Any]]:
    """The distinct near-duplicate pairs (a < b) of a Ray Dataset with `id, text` columns, held on the
    driver, and statistics. `verify`: `exact` checks each candidate's true shingle Jaccard on Ray Data
    (LSH bands aimed `EXACT_LSH_MARGIN` under the threshold; candidates whose signature estimate is
    more than `EXACT_PREFILTER_MARGIN` under it are not looked at), `signature` its signature estimate,
    `none` keeps every LSH candidate."""
    mode = verify_mode(verify)
    min_similarity = {"exact": threshold - EXACT_PREFILTER_MARGIN, "signature": threshold, "none": None}[mode]
    lsh_threshold = threshold - EXACT_LSH_MARGIN if mode == "exact" else threshold
    pairs, stats = candidate_pairs(live, num_perm, shingle_size, lsh_threshold, seed, false_negative_weight,
                                   min_similarity, max_bucket, num_partitions)
    found = _collect_pairs(pairs)
    stats.update({"verify": mode, "candidates": len(found)})
    if mode == "exact" and found:
        found = _collect_pairs(verify_pairs_exactly(live, found, shingle_size, threshold, num_partitions))
    return found, stats


def near_dedup(docs: Any, config: Any, num_partitions: int) -> tuple[Any, dict[str, Any]]:
    """Mark near duplicates in `docs` (all rows, with `reason`); return the dataset and statistics."""
    # deferred: pulls in ray, slow to import; only this path needs it
    import ray

    live = docs.filter(expr="reason == ''").select_columns(["id", "text"])
    if live.count() == 0:  # every row rejected before this step: nothing to shuffle (an empty shuffle has no schema)
        mode = verify_mode(config.verify)
        lsh_threshold = config.threshold - EXACT_LSH_MARGIN if mode == "exact" else config.threshold
        bands, rows = lsh_parameters(lsh_threshold, config.num_perm, config.false_negative_weight)
        return docs, {"bands": bands, "rows_per_band": rows, "verify": mode, "candidates": 0, "pairs": 0,
                      "clusters": 0, "duplicates": 0, "cluster_sizes": {}}
    pairs, stats = near_duplicate_pairs(live, config.num_perm, config.shingle_size, config.threshold,
                                        config.seed, config.false_negative_weight, config.verify,
                                        config.max_bucket, num_partitions)
    components = Components()
    for a, b in sorted(pairs):
        components.union(a, b)
    duplicates = components.duplicates()
    sizes = components.sizes()
    stats.update({"pairs": len(pairs), "clusters": len(sizes), "duplicates": len(duplicates),
                  "cluster_sizes": _histogram(sizes)})
    if not duplicates:
        return docs, stats
    return docs.map_batches(mark_near_duplicates, batch_format="pandas",
                            fn_kwargs={"keepers_ref": [ray.put(duplicates)]}), stats


def _histogram(sizes: list[int]) -> dict[str, int]:
    histogram: dict[str, int] = {}
    for size in sizes:
        histogram[str(size)] = histogram.get(str(size), 0) + 1
    return histogram

"""What dedup's two shuffles share (LSH bands in dedup.py, exact Jaccard in exact_jaccard.py).

`SHARDS` is the number of shuffle groups (a key % SHARDS): one pandas UDF call per shard, not per
bucket or pair. `from_holder` gives a per-batch function the table it was handed as `[ObjectRef]`
(Ray Data: the object store holds it once) or as `[table]` (a direct call, as in the unit tests).
"""

from __future__ import annotations

from typing import Any

import ray

SHARDS = 1024


def from_holder(holder: list[Any]) -> Any:
    value = holder[0]
    if isinstance(value, dict):
        return value
    return ray.get(value)

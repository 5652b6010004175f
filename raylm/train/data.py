"""A deterministic reader of packed parquet shards.

The order of training sequences is a pure function of the seed and the data position (the number of
sequences consumed so far): an endless stream of per-epoch permutations. The global batch at position
`p` is stream positions `[p, p + B)`, and worker `r` of `w` takes every `w`-th of them starting at `r`.
Because of that, a restart from a checkpoint (which stores the position) re-reads and skips nothing,
whatever the number of workers before and after.
"""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads


class PackedSequences:
    """All rows of one split, as an int32 array [sequences, seq_len + 1]."""

    def __init__(self, uri: str):
        table = pads.dataset(uri, format="parquet").to_table(columns=["tokens"])
        column = table.column("tokens").combine_chunks()
        flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        self.rows = flat.reshape(len(column), -1) if len(column) else np.zeros((0, 0), dtype=np.int32)
        self.uri = uri

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return self.rows.shape[1]

    def order(self, positions: np.ndarray, seed: int) -> np.ndarray:
        """Row indices for stream positions (epoch e uses permutation seeded by (seed, e))."""
        count = len(self.rows)
        epochs = positions // count
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            permutation = np.random.default_rng([seed, int(epoch)]).permutation(count)
            mask = epochs == epoch
            out[mask] = permutation[positions[mask] % count]
        return out

    def global_batch(self, position: int, batch_size: int, seed: int) -> np.ndarray:
        return self.order(np.arange(position, position + batch_size), seed)

    def worker_rows(self, position: int, batch_size: int, seed: int, rank: int, world: int) -> np.ndarray:
        return self.rows[self.global_batch(position, batch_size, seed)[rank::world]]

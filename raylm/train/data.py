"""A deterministic reader of packed parquet shards.

The order of training sequences is a pure function of the seed and the data position (the number of
sequences consumed so far): an endless stream of per-epoch permutations. The global batch at position
`p` is stream positions `[p, p + B)`, and worker `r` of `w` takes every `w`-th of them starting at `r`.
Because of that, a restart from a checkpoint (which stores the position) re-reads and skips nothing,
whatever the number of workers before and after.

Shards may carry an optional `loss_mask` column (int8, same length as `tokens`): target `tokens[i]`
(i >= 1) counts in the loss only where `loss_mask[i] == 1` (prompts in chat data do not).
"""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads

LOSS_MASK = "loss_mask"


def _fixed_lists(column, dtype) -> np.ndarray:
    column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(dtype)
    return flat.reshape(len(column), -1) if len(column) else np.zeros((0, 0), dtype=dtype)


class PackedSequences:
    """All rows of one split, as an int32 array [sequences, seq_len + 1], plus the loss mask if any."""

    def __init__(self, uri: str):
        dataset = pads.dataset(uri, format="parquet")
        columns = ["tokens"] + ([LOSS_MASK] if LOSS_MASK in dataset.schema.names else [])
        table = dataset.to_table(columns=columns)
        self.rows = _fixed_lists(table.column("tokens"), np.int32)
        self.mask = _fixed_lists(table.column(LOSS_MASK), np.int8) if LOSS_MASK in columns else None
        if self.mask is not None and self.mask.shape != self.rows.shape:
            raise ValueError(f"{uri}: column {LOSS_MASK!r} has shape {self.mask.shape}, expected the shape of "
                             f"'tokens' {self.rows.shape}")
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

    @staticmethod
    def worker_positions(position: int, batch_size: int, rank: int, world: int) -> np.ndarray:
        """The stream positions of the global batch at `position` that worker `rank` of `world` reads."""
        return np.arange(position, position + batch_size)[rank::world]

    def worker_indices(self, position: int, batch_size: int, seed: int, rank: int, world: int) -> np.ndarray:
        return self.order(self.worker_positions(position, batch_size, rank, world), seed)

    def worker_rows(self, position: int, batch_size: int, seed: int, rank: int, world: int) -> np.ndarray:
        return self.rows[self.worker_indices(position, batch_size, seed, rank, world)]

    def worker_batch(self, position: int, batch_size: int, seed: int, rank: int,
                     world: int) -> tuple[np.ndarray, np.ndarray | None]:
        """This worker's rows of the global batch at `position`, and their loss mask (None: all count)."""
        index = self.worker_indices(position, batch_size, seed, rank, world)
        return self.rows[index], (None if self.mask is None else self.mask[index])

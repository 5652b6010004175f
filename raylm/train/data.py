"""A deterministic, memory-bounded reader of a packed split.

The order of training sequences is a pure function of the seed and the data position (the number of
sequences consumed so far): an endless stream of per-epoch permutations. The global batch at position
`p` is stream positions `[p, p + B)`, and worker `r` of `w` takes every `w`-th of them starting at `r`.
Because of that, a restart from a checkpoint (which stores the position) re-reads and skips nothing,
whatever the number of workers before and after.

Rows are read when a batch asks for them, never the whole split: from the split's fixed-width token
files (`raylm.data.token_files`, one positional read per run of rows) or, for a split written before
those existed, from its parquet shards by row group (`raylm.train.parquet_rows`). Either way a worker
holds its batches, the permutation of the current epoch (4 bytes per sequence) and a shard index.
The reader is our own rather than Ray Data's streaming ingest (`ray.train.get_dataset_shard`): that
splits blocks between the workers of the moment and shuffles with buffers, so neither the order nor
the place to resume from is a function of (seed, position) on another worker count.

Shards may carry an optional `loss_mask` column (int8, same length as `tokens`): target `tokens[i]`
(i >= 1) counts in the loss only where `loss_mask[i] == 1` (prompts in chat data do not).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np

from raylm.data.token_files import LOSS_MASK, TOKENS_DIR, TokenFileRows, read_index
from raylm.train.parquet_rows import ParquetRowGroups

log = logging.getLogger("raylm")

__all__ = ["LOSS_MASK", "PackedSequences"]

CACHED_EPOCHS = 2  # a batch spans at most two epochs (when it is smaller than the split)


def open_rows(uri: str) -> TokenFileRows | ParquetRowGroups:
    """The row source of the split at `uri`: its token files, else its parquet shards by row group."""
    index = read_index(uri)
    if index is not None:
        return TokenFileRows(uri, index)
    log.warning("%s has no %s/ token files (written by tokenize since they exist): reading its parquet shards "
                "by row group, which is slower; `raylm tokenize --force` writes them", uri, TOKENS_DIR)
    return ParquetRowGroups(uri)


class PackedSequences:
    """One split's rows [sequences, seq_len + 1] (int32) and loss mask (int8, if any), read on demand."""

    def __init__(self, uri: str):
        self.uri = uri
        self.source = open_rows(uri)
        self._permutations: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def width(self) -> int:
        return self.source.width

    @property
    def has_mask(self) -> bool:
        return self.source.has_mask

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows `index` of the split and their loss mask (None: all targets count)."""
        return self.source.take(index)

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._permutations:
            count = len(self)
            permutation = np.random.default_rng([seed, epoch]).permutation(count)
            self._permutations[key] = permutation.astype(np.int32 if count < 2**31 else np.int64)
            while len(self._permutations) > CACHED_EPOCHS:
                self._permutations.popitem(last=False)
        return self._permutations[key]

    def order(self, positions: np.ndarray, seed: int) -> np.ndarray:
        """Row indices for stream positions (epoch e uses permutation seeded by (seed, e))."""
        count = len(self)
        epochs = positions // count
        out = np.empty_like(positions)
        for epoch in np.unique(epochs):
            mask = epochs == epoch
            out[mask] = self._permutation(seed, int(epoch))[positions[mask] % count]
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
        return self.worker_batch(position, batch_size, seed, rank, world)[0]

    def worker_batch(self, position: int, batch_size: int, seed: int, rank: int,
                     world: int) -> tuple[np.ndarray, np.ndarray | None]:
        """This worker's rows of the global batch at `position`, and their loss mask (None: all count)."""
        return self.take(self.worker_indices(position, batch_size, seed, rank, world))

"""Rows of a packed split read straight from its parquet shards, by row group, with a small cache.

The reader for splits that have no token files (`raylm.data.token_files`: written by the tokenize and
sft-data stages since they exist; an older workspace has parquet only). Parquet cannot read one row
of a row group without decoding the row group, so `take` decodes every row group its rows fall in and
keeps the last `cache_row_groups` decoded (a contiguous slice, such as the validation rows, reads each
row group once). Memory: the footers (a few numbers per row group) and at most `cache_row_groups`
decoded row groups (one Ray Data block of the tokenize stage each, tens of MB), never the whole split.
Random batches touch a row group per row, so this is slower than the token files: it keeps an old
workspace training, and re-running `tokenize` with `--force` writes the token files.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raylm.data.token_files import LOSS_MASK, fixed_width, split_parquet_files
from raylm.storage import filesystem_for

CACHE_ROW_GROUPS = 4


def _list_size(schema: pa.Schema, name: str) -> int | None:
    kind = schema.field(name).type
    return kind.list_size if isinstance(kind, pa.FixedSizeListType) else None


class ParquetRowGroups:
    """`take(index)` over a split's parquet shards; see the module docstring for memory and speed."""

    def __init__(self, uri: str, cache_row_groups: int = CACHE_ROW_GROUPS):
        self.uri = uri
        self.filesystem, root = filesystem_for(uri)
        self.paths = split_parquet_files(self.filesystem, root)
        if not self.paths:
            raise ValueError(f"{uri}: no parquet files there")
        self.metadata = [pq.read_metadata(path, filesystem=self.filesystem) for path in self.paths]
        schema = self.metadata[0].schema.to_arrow_schema()
        if "tokens" not in schema.names:
            raise ValueError(f"{uri}: no 'tokens' column (columns: {schema.names})")
        self.has_mask = LOSS_MASK in schema.names
        self.columns = ["tokens"] + ([LOSS_MASK] if self.has_mask else [])
        self.groups = [(file, group) for file, metadata in enumerate(self.metadata)
                       for group in range(metadata.num_row_groups)]
        counts = [self.metadata[file].row_group(group).num_rows for file, group in self.groups]
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        self.cache_row_groups = cache_row_groups
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        width, mask_width = _list_size(schema, "tokens"), _list_size(schema, LOSS_MASK) if self.has_mask else None
        if width is None:  # a variable-size list column (not what the stages write): the first row tells
            first = next((g for g in range(len(self.groups)) if self.starts[g + 1] > self.starts[g]), None)
            width = 0 if first is None else self._row_group(first)[0].shape[1]
        if mask_width is not None and mask_width != width:
            raise ValueError(f"{uri}: column {LOSS_MASK!r} has rows of {mask_width}, expected the width of 'tokens' "
                             f"({width})")
        self.width = width

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _row_group(self, group: int) -> tuple[np.ndarray, np.ndarray | None]:
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        file, number = self.groups[group]
        parquet = pq.ParquetFile(self.paths[file], filesystem=self.filesystem, metadata=self.metadata[file])
        table = parquet.read_row_group(number, columns=self.columns, use_threads=False)
        rows = fixed_width(table.column("tokens"), np.int32)
        mask = fixed_width(table.column(LOSS_MASK), np.int8) if self.has_mask else None
        if mask is not None and mask.shape != rows.shape:
            raise ValueError(f"{self.paths[file]}: column {LOSS_MASK!r} has shape {mask.shape}, expected the shape "
                             f"of 'tokens' {rows.shape}")
        self._cache[group] = (rows, mask)
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return rows, mask

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows `index` (split-wide row numbers, any order): int32 [n, width] and the loss mask (or None)."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.uri}: rows {index.min()}..{index.max()} asked of {len(self)}")
        rows = np.empty((len(index), self.width), dtype=np.int32)
        mask = np.empty((len(index), self.width), dtype=np.int8) if self.has_mask else None
        group_of = np.searchsorted(self.starts, index, side="right") - 1
        for group in np.unique(group_of):  # ascending: a slice reads each row group once
            where = np.flatnonzero(group_of == group)
            group_rows, group_mask = self._row_group(int(group))
            local = index[where] - self.starts[group]
            rows[where] = group_rows[local]
            if mask is not None:
                mask[where] = group_mask[local]
        return rows, mask

"""Fixed-width token files beside packed parquet shards: what the trainer reads, a row at a time.

A packed split is a folder of parquet shards (`tokens`: `seq_len + 1` int32 per row; chat data adds
`loss_mask`, int8). Beside them, in `_tokens/`, each shard also has its rows as one raw file:
`<shard>.tokens` (little-endian uint16, or uint32 when the vocabulary has more than 65,536 ids) and,
for chat data, `<shard>.mask` (int8). `_tokens/index.json` lists the shards in the order of their
parquet files (sorted by path, the order `pyarrow.dataset` reads them in) with their row counts. Row
`i` of a shard is bytes `[i * row_bytes, (i + 1) * row_bytes)` of its file, so a reader takes any row
with one positional read (a ranged GET on an object store) and holds nothing but the rows it asked
for, whatever the size of the corpus (nanoGPT and llm.c keep their tokens the same way; they map
the file, which leaves every page read in the process's resident memory until the kernel drops it).

The leading underscore keeps the folder out of parquet readers (`pyarrow.dataset`, Ray Data), so the
parquet shards read as before. A split without `_tokens/` (written before these files existed) is
read from parquet by row group (`raylm.train.parquet_rows`).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raylm.storage import filesystem_for

TOKENS_DIR = "_tokens"
INDEX = "index.json"
FORMAT = 1
LOSS_MASK = "loss_mask"
OPEN_FILES = 64  # file handles a reader keeps open (LRU); a corpus may have thousands of shards
REMOTE_THREADS = 16  # concurrent ranged reads on an object store


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id of the vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def split_parquet_files(filesystem: pafs.FileSystem, root: str) -> list[str]:
    """The split's parquet shards (paths on `filesystem`), sorted: the reading order of the split's rows.
    `root` may be a folder or one parquet file."""
    info = filesystem.get_file_info(root)
    if info.type == pafs.FileType.File:
        return [root]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{root}: no such packed split")
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    hidden = ("/.", "/_")
    return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                  and not any(part in i.path[len(root.rstrip("/")):] for part in hidden))


def fixed_width(column: pa.ChunkedArray | pa.Array, dtype: np.dtype) -> np.ndarray:
    """A fixed-size (or equal-length) list column as a 2-D array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return flat.reshape(len(column), -1) if len(column) else np.zeros((0, 0), dtype=dtype)


def write_shard(batches: Iterable[pa.RecordBatch], filesystem: pafs.FileSystem, tokens_path: str,
                mask_path: str | None, dtype: np.dtype, width: int, origin: str) -> int:
    """Write a shard's rows (`tokens` and, with `mask_path`, `loss_mask`) as raw files; returns the row count.
    Memory: one batch."""
    limit = np.iinfo(dtype).max
    rows = 0
    tokens_out = filesystem.open_output_stream(tokens_path, compression=None)
    mask_out = filesystem.open_output_stream(mask_path, compression=None) if mask_path else None
    try:
        for batch in batches:
            tokens = fixed_width(batch.column("tokens"), np.int64)
            if len(tokens) and tokens.shape[1] != width:
                raise ValueError(f"{origin}: rows of {tokens.shape[1]} tokens, expected {width}")
            if len(tokens) and (tokens.min() < 0 or tokens.max() > limit):
                raise ValueError(f"{origin}: token ids outside [0, {limit}], the range of {dtype.name}")
            tokens_out.write(tokens.astype(dtype).tobytes())
            if mask_out is not None:
                mask = fixed_width(batch.column(LOSS_MASK), np.int8)
                if mask.shape != tokens.shape:
                    raise ValueError(f"{origin}: column {LOSS_MASK!r} has shape {mask.shape}, expected the shape "
                                     f"of 'tokens' {tokens.shape}")
                mask_out.write(mask.tobytes())
            rows += len(tokens)
    finally:
        tokens_out.close()
        if mask_out is not None:
            mask_out.close()
    return rows


def shard_names(root: str, parquet_path: str) -> tuple[str, str]:
    """The token and mask file names (relative to the split) of a parquet shard."""
    relative = parquet_path[len(root.rstrip("/")) + 1:] if parquet_path != root else parquet_path.rsplit("/", 1)[-1]
    stem = relative.removesuffix(".parquet")
    return f"{TOKENS_DIR}/{stem}.tokens", f"{TOKENS_DIR}/{stem}.mask"


def write_shard_files(batches: Iterable[pa.RecordBatch], filesystem: pafs.FileSystem, root: str, parquet_path: str,
                      with_mask: bool, dtype: str, width: int) -> dict:
    """Write the token files of the shard `parquet_path` of the split at `root` from its rows; its index entry."""
    tokens_name, mask_name = shard_names(root, parquet_path)
    filesystem.create_dir(f"{root}/{tokens_name}".rsplit("/", 1)[0], recursive=True)
    rows = write_shard(batches, filesystem, f"{root}/{tokens_name}", f"{root}/{mask_name}" if with_mask else None,
                       np.dtype(dtype), width, parquet_path)
    return {"source": parquet_path[len(root.rstrip("/")) + 1:], "tokens": tokens_name,
            "mask": mask_name if with_mask else None, "rows": rows}


def convert_shard(filesystem: pafs.FileSystem, root: str, parquet_path: str, dtype: str, width: int,
                  batch_rows: int = 1024) -> dict:
    """Write the token files of a parquet shard already written, reading it `batch_rows` rows at a time."""
    file = pq.ParquetFile(parquet_path, filesystem=filesystem)
    with_mask = LOSS_MASK in file.schema_arrow.names
    columns = ["tokens"] + ([LOSS_MASK] if with_mask else [])
    return write_shard_files(file.iter_batches(batch_size=batch_rows, columns=columns), filesystem, root, parquet_path,
                             with_mask, dtype, width)


def write_index(filesystem: pafs.FileSystem, root: str, shards: list[dict], dtype: str, width: int) -> None:
    """`_tokens/index.json` of the split at `root`; `shards` in the order of `split_parquet_files`."""
    masks = {shard["mask"] is not None for shard in shards}
    if len(masks) > 1:
        raise ValueError(f"{root}: some shards have a {LOSS_MASK!r} column and some do not")
    index = {"format": FORMAT, "dtype": np.dtype(dtype).str, "width": width, "loss_mask": masks == {True},
             "shards": shards}
    filesystem.create_dir(f"{root}/{TOKENS_DIR}", recursive=True)
    with filesystem.open_output_stream(f"{root}/{TOKENS_DIR}/{INDEX}", compression=None) as out:
        out.write(json.dumps(index, indent=1).encode())


def read_index(uri: str) -> dict | None:
    """The token-file index of the split at `uri`, or None when the split has none."""
    filesystem, root = filesystem_for(uri)
    path = f"{root.rstrip('/')}/{TOKENS_DIR}/{INDEX}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path, compression=None) as stream:
        index = json.loads(stream.read())
    if index.get("format") != FORMAT:
        raise ValueError(f"{uri}/{TOKENS_DIR}/{INDEX}: format {index.get('format')!r}, expected {FORMAT}")
    return index


class TokenFileRows:
    """Rows of a split's token files, read on demand: `take(index)` reads exactly those rows.

    Memory: the rows asked for, the index (a few numbers per shard) and up to `OPEN_FILES` open files.
    Consecutive rows of a shard are read in one go; on an object store, reads run `REMOTE_THREADS` at once.
    """

    def __init__(self, uri: str, index: dict):
        self.uri = uri
        self.filesystem, root = filesystem_for(uri)
        self.root = root.rstrip("/")
        self.dtype = np.dtype(index["dtype"])
        self.width = int(index["width"])
        self.has_mask = bool(index["loss_mask"])
        self.shards = index["shards"]
        counts = np.array([shard["rows"] for shard in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.remote = not isinstance(self.filesystem, pafs.LocalFileSystem)
        self._files: OrderedDict[str, pa.NativeFile] = OrderedDict()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _file(self, name: str, row_bytes: int, rows: int) -> pa.NativeFile:
        with self._lock:
            if name in self._files:
                self._files.move_to_end(name)
                return self._files[name]
            file = self.filesystem.open_input_file(f"{self.root}/{name}")
            size = file.size()
            if size != rows * row_bytes:
                file.close()
                raise ValueError(f"{self.uri}/{name}: {size} bytes, expected {rows} rows of {row_bytes} "
                                 f"bytes (the token files do not match {TOKENS_DIR}/{INDEX}; re-run the stage)")
            self._files[name] = file
            while len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)[1].close()
            return file

    def _read(self, shard: int, first: int, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """`count` consecutive rows of `shard` from its row `first`."""
        entry = self.shards[shard]
        row_bytes = self.width * self.dtype.itemsize
        data = self._file(entry["tokens"], row_bytes, entry["rows"]).read_at(count * row_bytes, first * row_bytes)
        rows = np.frombuffer(data, dtype=self.dtype).reshape(count, self.width).astype(np.int32)
        if not self.has_mask:
            return rows, None
        data = self._file(entry["mask"], self.width, entry["rows"]).read_at(count * self.width, first * self.width)
        return rows, np.frombuffer(data, dtype=np.int8).reshape(count, self.width).copy()

    def take(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows `index` (split-wide row numbers, any order, repeats allowed): int32 [n, width], and the
        int8 loss mask of the same shape (None when the split has none)."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"{self.uri}: rows {index.min()}..{index.max()} asked of {len(self)}")
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        shard = np.searchsorted(self.starts, ordered, side="right") - 1
        breaks = np.flatnonzero((np.diff(ordered) != 1) | (np.diff(shard) != 0)) + 1
        runs = np.split(np.arange(len(ordered)), breaks) if len(ordered) else []
        reads = [(int(shard[run[0]]), int(ordered[run[0]] - self.starts[shard[run[0]]]), len(run)) for run in runs]
        if self.remote and len(reads) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(REMOTE_THREADS, thread_name_prefix="token-files")
            blocks = list(self._pool.map(lambda read: self._read(*read), reads))
        else:
            blocks = [self._read(*read) for read in reads]
        rows = np.empty((len(index), self.width), dtype=np.int32)
        mask = np.empty((len(index), self.width), dtype=np.int8) if self.has_mask else None
        for run, (block, block_mask) in zip(runs, blocks):
            rows[order[run]] = block
            if mask is not None:
                mask[order[run]] = block_mask
        return rows, mask

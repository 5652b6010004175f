"""A parquet folder cut into pieces of about equal size, one Ray Data task each.

The tokenize stage reads its split inside its own map tasks, one piece per task, so that reading,
encoding, packing and writing run as a single fused Ray Data operator. With Ray 2.60's
`read_parquet` (datasource v2) on a small cluster the stage barely used its second worker
(measured on 2 CPUs, 24 MB: 1.05x the speed of one worker):
- a folder is listed by one `ListFiles` task (about 1.5 s), and a split of a few small files is
  read by one task as one block;
- re-cutting that block (`repartition`) adds an operator, and Ray Data reserves at least one CPU for
  every operator of a pipeline, so read, repartition and write each held a CPU that the tokenize
  tasks could not use.
As one operator (pieces -> read, encode, pack -> write) 2 workers run at 1.47x the speed of one
(`python benchmarks/tokenization.py`).

A piece is a whole file, or, for a file over `piece_bytes`, a run of its row groups: the driver
lists the folder once and reads only the footers of large files. Pieces come largest first, so the
tasks that start last are the short ones and no worker is left with a long tail.
"""

from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PIECE_BYTES = 32 * 2**20  # parquet bytes per task, about; larger files are split by row groups


def parquet_files(uri: str) -> tuple[pafs.FileSystem, list[pafs.FileInfo]]:
    """The filesystem of `uri` (a local path, file://, s3://, gs://) and its parquet files, by path."""
    filesystem, root = pafs.FileSystem.from_uri(uri)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    files = [info for info in infos if info.type == pafs.FileType.File and info.path.endswith(".parquet")
             and not info.base_name.startswith((".", "_"))]
    return filesystem, sorted(files, key=lambda info: info.path)


def parquet_pieces(uri: str, piece_bytes: int = PIECE_BYTES) -> tuple[pafs.FileSystem, list[dict]]:
    """Pieces `{"path", "row_groups", "bytes"}` (empty `row_groups`: the whole file), largest first."""
    filesystem, files = parquet_files(uri)
    if not files:
        raise ValueError(f"{uri}: no parquet files there")
    pieces = []
    for info in files:
        if info.size <= piece_bytes:
            pieces.append({"path": info.path, "row_groups": [], "bytes": info.size})
            continue
        metadata = pq.read_metadata(info.path, filesystem=filesystem)
        groups, size = [], 0
        for index in range(metadata.num_row_groups):
            row_group = metadata.row_group(index)
            groups.append(index)
            size += sum(row_group.column(c).total_compressed_size for c in range(row_group.num_columns))
            if size >= piece_bytes or index == metadata.num_row_groups - 1:
                pieces.append({"path": info.path, "row_groups": groups, "bytes": size})
                groups, size = [], 0
    pieces.sort(key=lambda piece: piece["bytes"], reverse=True)
    return filesystem, pieces


def read_piece(piece: dict, filesystem: pafs.FileSystem, columns: list[str], batch_size: int) -> Iterator[pa.RecordBatch]:
    """The piece's rows, `batch_size` at a time."""
    file = pq.ParquetFile(piece["path"], filesystem=filesystem)
    yield from file.iter_batches(batch_size=batch_size, row_groups=piece["row_groups"] or None, columns=columns)

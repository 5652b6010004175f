"""The training reader reads rows on demand: the same batches as the old whole-split reader, in bounded memory.

`InMemoryReader` is the reader as it was before token files (every row of the split in one int32 array);
the new one must give identical batches for every (seed, position, rank, world), from token files and
from parquet alone (an old workspace). The memory tests open a split several times larger than an RSS
budget in a fresh process and read batches through it (the API both readers have), so the old reader
fails them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from raylm.data.token_files import TOKENS_DIR, TokenFileRows, convert_shard, split_parquet_files, token_dtype, write_index
from raylm.train.data import PackedSequences
from raylm.train.parquet_rows import ParquetRowGroups
from tests.conftest import REPO

WIDTH = 17


class InMemoryReader:
    """The reader before token files (raylm/train/data.py at 9d8c080): the whole split in memory."""

    def __init__(self, uri: str):
        dataset = pads.dataset(uri, format="parquet")
        columns = ["tokens"] + (["loss_mask"] if "loss_mask" in dataset.schema.names else [])
        table = dataset.to_table(columns=columns)

        def fixed(column, dtype):
            column = column.combine_chunks()
            return column.flatten().to_numpy(zero_copy_only=False).astype(dtype).reshape(len(column), -1)

        self.rows = fixed(table.column("tokens"), np.int32)
        self.mask = fixed(table.column("loss_mask"), np.int8) if "loss_mask" in columns else None

    def worker_batch(self, position, batch_size, seed, rank, world):
        positions = np.arange(position, position + batch_size)[rank::world]
        count = len(self.rows)
        epochs = positions // count
        index = np.empty_like(positions)
        for epoch in np.unique(epochs):
            permutation = np.random.default_rng([seed, int(epoch)]).permutation(count)
            index[epochs == epoch] = permutation[positions[epochs == epoch] % count]
        return self.rows[index], (None if self.mask is None else self.mask[index])


def write_split(folder, shard_rows, vocab_size, loss_mask, token_files=True, row_group_size=7, seed=0):
    """Parquet shards of random rows (small row groups, so reads cross them) and, optionally, their token files
    written as the tokenize stage writes them (one `convert_shard` per shard, then the index)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for number, count in enumerate(shard_rows):
        tokens = rng.integers(0, vocab_size, size=count * WIDTH, dtype=np.int32)
        columns = {"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens), WIDTH)}
        if loss_mask:
            columns["loss_mask"] = pa.FixedSizeListArray.from_arrays(
                pa.array(rng.integers(0, 2, size=count * WIDTH, dtype=np.int8)), WIDTH)
        pq.write_table(pa.table(columns), folder / f"part-{number:03d}.parquet", row_group_size=row_group_size)
    if token_files:
        filesystem, dtype = pafs.LocalFileSystem(), token_dtype(vocab_size).str
        shards = [convert_shard(filesystem, str(folder), path, dtype, WIDTH, batch_rows=5)
                  for path in split_parquet_files(filesystem, str(folder))]
        write_index(filesystem, str(folder), shards, dtype, WIDTH)
    return str(folder)


CASES = [(0, 8, 0, 1), (5, 8, 1, 2), (37, 16, 2, 3), (90, 24, 0, 4), (96, 12, 3, 4), (250, 300, 1, 3)]


@pytest.mark.parametrize("loss_mask", [False, True])
@pytest.mark.parametrize("vocab_size", [300, 70_000])  # token files of uint16, and of uint32
def test_new_reader_gives_the_old_readers_batches_from_token_files_and_from_parquet(tmp_path, loss_mask, vocab_size):
    split = write_split(tmp_path / "split", [40, 3, 0, 57], vocab_size, loss_mask)  # 100 rows, an empty shard
    old = InMemoryReader(split)
    new = PackedSequences(split)
    fallback = PackedSequences(split)
    fallback.source = ParquetRowGroups(split, cache_row_groups=2)
    assert isinstance(new.source, TokenFileRows) and len(new) == len(fallback) == 100 and new.width == WIDTH
    for seed in (0, 7):
        for position, batch, rank, world in CASES:  # across epochs, and one batch larger than the split
            rows, mask = old.worker_batch(position, batch, seed, rank, world)
            for reader in (new, fallback):
                got_rows, got_mask = reader.worker_batch(position, batch, seed, rank, world)
                assert got_rows.dtype == np.int32 and np.array_equal(got_rows, rows)
                assert (got_mask is None) == (mask is None) and (mask is None or np.array_equal(got_mask, mask))
    every = np.arange(100)
    assert np.array_equal(new.take(every)[0], old.rows) and np.array_equal(fallback.take(every)[0], old.rows)


def test_a_split_without_token_files_is_read_from_parquet_and_stale_token_files_are_refused(tmp_path):
    split = write_split(tmp_path / "split", [30, 30], 300, loss_mask=False, token_files=False)
    data = PackedSequences(split)
    assert isinstance(data.source, ParquetRowGroups)
    assert np.array_equal(data.worker_batch(10, 8, 0, 0, 1)[0], InMemoryReader(split).worker_batch(10, 8, 0, 0, 1)[0])

    split = write_split(tmp_path / "stale", [30, 30], 300, loss_mask=False)
    index = json.loads((tmp_path / "stale" / TOKENS_DIR / "index.json").read_text())
    with open(tmp_path / "stale" / index["shards"][1]["tokens"], "ab") as tokens:
        tokens.write(b"\0" * 34)
    data = PackedSequences(split)
    with pytest.raises(ValueError, match=r"part-001.tokens: 1054 bytes, expected 30 rows of 34 bytes"):
        data.take(np.arange(60))


def test_token_files_on_s3_read_like_local_ones(tmp_path, s3_bucket):
    local = write_split(tmp_path / "split", [20, 25], 300, loss_mask=True, token_files=False)
    filesystem, root = pafs.FileSystem.from_uri(f"{s3_bucket}/split")
    for path in split_parquet_files(pafs.LocalFileSystem(), local):
        pafs.copy_files(path, f"{root}/{path.rsplit('/', 1)[1]}", destination_filesystem=filesystem)
    dtype = token_dtype(300).str
    shards = [convert_shard(filesystem, root, path, dtype, WIDTH) for path in split_parquet_files(filesystem, root)]
    write_index(filesystem, root, shards, dtype, WIDTH)
    remote = PackedSequences(f"{s3_bucket}/split")
    assert isinstance(remote.source, TokenFileRows) and remote.source.remote
    old = InMemoryReader(local)
    for position, batch, rank, world in CASES[:4]:
        rows, mask = remote.worker_batch(position, batch, 3, rank, world)
        expected_rows, expected_mask = old.worker_batch(position, batch, 3, rank, world)
        assert np.array_equal(rows, expected_rows) and np.array_equal(mask, expected_mask)


# A fresh process opens the split and reads batches; it prints how far its RSS grew. Only API the old reader
# had too (PackedSequences(uri), len, worker_batch), so this fails on the old code.
MEASURE = textwrap.dedent("""
    import gc, sys, psutil
    from raylm.train.data import PackedSequences
    uri, batches, batch, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    process = psutil.Process()
    PackedSequences(warmup).worker_batch(0, 2, 0, 0, 1)  # pyarrow's parquet reader starts (once, ~70 MB)
    gc.collect()
    start = peak = process.memory_info().rss
    data = PackedSequences(uri)
    for number in range(batches):
        rows, mask = data.worker_batch(number * batch, batch, 0, 1, 2)
        assert len(rows) == batch // 2
        peak = max(peak, process.memory_info().rss)
    print(peak - start, len(data) * data.width * 4)
""")

SPLIT_ROWS = 24_000  # x 513 tokens: 49 MB as int32 in memory (25 MB of uint16 token files)


@pytest.fixture(scope="module")
def large_split(tmp_path_factory):
    folder = tmp_path_factory.mktemp("large") / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for number in range(6):
        tokens = rng.integers(0, 50_000, size=SPLIT_ROWS // 6 * 513, dtype=np.int32)
        pq.write_table(pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens), 513)}),
                       folder / f"part-{number}.parquet", row_group_size=500)
    (folder.parent / "warmup").mkdir()
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(4 * 513, dtype=np.int32)), 513)
    pq.write_table(pa.table({"tokens": tokens}), folder.parent / "warmup" / "part-0.parquet")
    return folder


def rss_growth(uri: str, batches: int, batch: int) -> tuple[int, int]:
    warmup = uri.rsplit("/", 1)[0] + "/warmup"
    result = subprocess.run([sys.executable, "-c", MEASURE, uri, str(batches), str(batch), warmup], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth, split_bytes = map(int, result.stdout.split())
    return growth, split_bytes


@pytest.mark.parametrize("token_files", [True, False])
def test_reading_a_split_several_times_larger_than_the_rss_budget_stays_within_it(large_split, token_files, tmp_path):
    if token_files:
        filesystem, dtype, root = pafs.LocalFileSystem(), token_dtype(50_000).str, str(large_split)
        write_index(filesystem, root, [convert_shard(filesystem, root, path, dtype, 513)
                                       for path in split_parquet_files(filesystem, root)], dtype, 513)
        # a whole epoch in batches of 64 (each worker's half: 32 rows)
        growth, split_bytes = rss_growth(root, SPLIT_ROWS // 64, 64)
        budget = split_bytes // 4
    else:  # parquet by row group: random rows decode a row group each, so fewer batches
        shutil.rmtree(large_split / TOKENS_DIR, ignore_errors=True)
        growth, split_bytes = rss_growth(str(large_split), 12, 64)
        budget = split_bytes // 2  # 4 cached row groups of 1 MB, and pyarrow's decoding buffers
    assert growth < budget, f"RSS grew {growth / 2**20:.0f} MB reading a {split_bytes / 2**20:.0f} MB split"


def test_sft_data_writes_token_files_with_the_loss_mask(tmp_path):
    from raylm.config import TokenizerConfig
    from raylm.data.chat import TEMPLATE_TOKENS
    from raylm.data.sft import sft_data
    from raylm.data.tokenizer import train_tokenizer
    from raylm.workspace import Workspace

    rows = [{"instruction": f"Add {a} and {b}.", "output": f"{a} plus {b} is {a + b}."} for a in range(12) for b in range(5)]
    tokenizer = train_tokenizer([json.dumps(row) for row in rows], TokenizerConfig(
        vocab_size=300, min_frequency=1, special_tokens=list(TEMPLATE_TOKENS.values())))
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    stage = Workspace(str(tmp_path / "ws")).stage("sft-data", {})
    stage.prepare()
    packed = sft_data(str(tmp_path / "chat.jsonl"), tokenizer.to_str(), 48, 0.2, 0, None, stage)
    for split in ("train", "val"):
        reader, old = PackedSequences(packed.outputs[split]), InMemoryReader(packed.outputs[split])
        assert isinstance(reader.source, TokenFileRows) and reader.has_mask
        rows_read, mask = reader.take(np.arange(len(reader)))
        assert np.array_equal(rows_read, old.rows) and np.array_equal(mask, old.mask) and mask.any()

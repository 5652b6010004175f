"""Tokens/s of the `tokenize` stage's Ray Data pass against `tokenizers`' own batch encoding in one process.

On the same documents (the Python standard library, or --corpus files), written as --files parquet files:
  - baselines, in this one process: `Tokenizer.encode_batch` with its Rust thread pool on (the
    library's default) and with TOKENIZERS_PARALLELISM=false (one thread); and `encode_batch_fast`
    on one thread, which does the stage's work (no character offsets, which the stage does not need);
  - ours: the stage's own pass (`write_packed`: one Ray Data task per parquet piece reads, encodes,
    packs and writes) with 1 and 2 workers (`concurrency`), one CPU each.
The tokenizer is trained (as the stage does) on the train part only; bytes per token are measured
on the held-out part. Goal (issue 4): 2 workers >= 1.5x the single-process baseline on 2 cores.
The baseline with its thread pool on already uses both cores; on 2 cores no stage can be 1.5x that.

    python benchmarks/tokenization.py [--mb 24] [--batch-size 64] [--files 8] [--vocab 4096] [--seq-len 256] [--packing greedy]
"""

from __future__ import annotations

import os

import _repo  # noqa: F401  (puts the repository root on sys.path)

import argparse  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from raylm.config import TokenizerConfig  # noqa: E402
from raylm.data.sources import list_stdlib_files  # noqa: E402
from raylm.data.tokenize import write_packed  # noqa: E402
from raylm.data.tokenizer import token_byte_lengths, train_tokenizer  # noqa: E402


def load_documents(megabytes: float, corpus: list[str]) -> list[str]:
    files = corpus or list_stdlib_files(int(megabytes * 2**20))
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in files]


def write_parquet_parts(texts: list[str], folder: Path, parts: int = 8) -> None:
    folder.mkdir(parents=True)
    step = -(-len(texts) // parts)
    for index in range(parts):
        chunk = texts[index * step:(index + 1) * step]
        if chunk:
            pq.write_table(pa.table({"text": chunk}), folder / f"part-{index}.parquet")


def ray_stage(source: Path, target: Path, tokenizer_json: str, seq_len: int, packing: str, workers: int,
              batch_size: int) -> tuple[float, int]:
    started = time.perf_counter()
    config = TokenizerConfig(packing=packing, batch_size=batch_size, concurrency=workers)
    write_packed(str(source), tokenizer_json, seq_len, config, str(target))
    seconds = time.perf_counter() - started
    tokens = int(pq.read_table(str(target), columns=["n_tokens"]).column("n_tokens").to_numpy().sum())
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=24.0, help="megabytes of standard-library text")
    parser.add_argument("--corpus", nargs="*", default=[], help="text files to use instead")
    parser.add_argument("--files", type=int, default=8, help="parquet files the documents are written to")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--packing", default="greedy", choices=["greedy", "best_fit"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timed runs each")
    args = parser.parse_args()

    texts = load_documents(args.mb, args.corpus)
    val, train = texts[::10], [t for i, t in enumerate(texts) if i % 10]
    total_bytes = sum(len(t.encode()) for t in texts)
    tokenizer = train_tokenizer(train, TokenizerConfig(vocab_size=args.vocab, sample_bytes=10**12))
    tokenizer_json = tokenizer.to_str()
    lengths = token_byte_lengths(tokenizer)
    val_ids = [e.ids for e in tokenizer.encode_batch(val, add_special_tokens=False)]
    val_bytes_per_token = sum(int(lengths[ids].sum()) for ids in val_ids) / sum(len(ids) for ids in val_ids)

    def baseline(threads: str, encode) -> tuple[float, int]:
        os.environ["TOKENIZERS_PARALLELISM"] = threads
        best, tokens = float("inf"), 0
        for _ in range(args.repeats):
            started = time.perf_counter()
            encodings = encode(texts, add_special_tokens=False)
            best = min(best, time.perf_counter() - started)
            tokens = sum(len(e.ids) for e in encodings)
        return best, tokens

    rows = {"encode_batch, 1 process (threads on)": baseline("true", tokenizer.encode_batch),
            "encode_batch, 1 process, 1 thread": baseline("false", tokenizer.encode_batch),
            "encode_batch_fast, 1 process, 1 thread": baseline("false", tokenizer.encode_batch_fast)}
    os.environ["TOKENIZERS_PARALLELISM"] = "false"

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="raylm-bench-tok-") as scratch:
        source = Path(scratch) / "docs"
        write_parquet_parts(texts, source, args.files)
        ray_stage(source, Path(scratch) / "warmup", tokenizer_json, args.seq_len, args.packing, 2, args.batch_size)
        for workers in (1, 2):
            best, tokens = float("inf"), 0
            for repeat in range(args.repeats):
                seconds, tokens = ray_stage(source, Path(scratch) / f"out-{workers}-{repeat}", tokenizer_json,
                                            args.seq_len, args.packing, workers, args.batch_size)
                best = min(best, seconds)
            # the stage's tokens include one <|eos|> per document; count text tokens like the baseline
            rows[f"Ray Data stage, {workers} worker{'s' * (workers > 1)}"] = (best, tokens - len(texts))
    ray.shutdown()

    print(f"\n{len(texts)} documents in {args.files} files, {total_bytes / 2**20:.1f} MiB, vocab {tokenizer.get_vocab_size()}, "
          f"seq_len {args.seq_len}, {args.packing} packing, {os.cpu_count()} CPUs visible, load {os.getloadavg()[0]:.1f}")
    print(f"{'':40} {'seconds':>9} {'tokens':>11} {'tokens/s':>11}")
    rate = {}
    for name, (seconds, tokens) in rows.items():
        rate[name] = tokens / seconds
        print(f"{name:40} {seconds:9.2f} {tokens:11d} {rate[name]:11.0f}")
    base, base1, fast1, ray1, ray2 = rate.values()
    print(f"val bytes/token: {val_bytes_per_token:.3f}")
    print(f"tokenize: mib={total_bytes / 2**20:.1f} baseline_tok_s={base:.0f} baseline_1thread_tok_s={base1:.0f} "
          f"ray1_tok_s={ray1:.0f} ray2_tok_s={ray2:.0f} ray2_vs_baseline={ray2 / base:.2f} "
          f"ray2_vs_baseline_1thread={ray2 / base1:.2f} ray2_vs_fast_1thread={ray2 / fast1:.2f} "
          f"ray2_vs_ray1={ray2 / ray1:.2f} "
          f"val_bytes_per_token={val_bytes_per_token:.3f} load={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""What a remote workspace costs: checkpoint save and load on a local disk against an S3 server on loopback.

For a tiny and a small model (the trainer's own `save_checkpoint` / `load_model`, DCP shards plus the JSON
files), side by side in one run: the save into a local folder (what a training step waits for when Ray
uploads in the background), the upload of that folder to its run storage (a local folder, or S3 through
pyarrow, which is what Ray Train's storage does), and the load back (download, verification, DCP load).
The S3 server is moto's server mode on 127.0.0.1 (`pip install 'moto[server]'`), so the figures measure
the S3 protocol path, not a network.

    python benchmarks/storage.py [--repeats 3] [--sizes tiny,small]

Ends with one line: `storage: tiny_save_s=... tiny_upload_local_s=... tiny_upload_s3_s=... ...`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401  (puts the repository root on sys.path)

import pyarrow.fs as pafs  # noqa: E402
import torch  # noqa: E402

from raylm.model import TransformerConfig, build_model  # noqa: E402
from raylm.model.sizing import parameter_count  # noqa: E402
from raylm.storage import filesystem_for  # noqa: E402
from raylm.train.checkpoint import load_model, local_checkpoint, save_checkpoint  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402

SIZES = {"tiny": TransformerConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=2, seq_len=64),
         "small": TransformerConfig(vocab_size=8192, d_model=384, n_layers=6, n_heads=6, seq_len=256)}


def timed(action) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def upload(local: str, destination: str) -> None:
    fs, path = filesystem_for(destination)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local, path, destination_filesystem=fs)


def measure(name: str, config: TransformerConfig, targets: dict[str, str], repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, config.vocab_size, (1, 8))).sum().backward()
    optimizer.step()  # AdamW moments exist, as in a real checkpoint
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="raylm-bench-storage-") as scratch:
        for repeat in range(repeats):
            local = f"{scratch}/save-{repeat}"
            figures.setdefault("save", []).append(timed(lambda: save_checkpoint(
                local, model, optimizer, {"step": repeat}, config.to_dict(), None, rank=0)))
            for store, root in targets.items():
                destination = f"{root}/{name}/ckpt-{repeat}"
                figures.setdefault(f"upload_{store}", []).append(timed(lambda: upload(local, destination)))

                def load_back() -> None:
                    with local_checkpoint(destination) as directory:
                        load_model(directory)

                figures.setdefault(f"load_{store}", []).append(timed(load_back))
        size = sum(p.stat().st_size for p in Path(f"{scratch}/save-0").rglob("*") if p.is_file())
    return {"bytes": size, "params": parameter_count(config).total,
            **{key: statistics.median(values) for key, values in figures.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="median of this many saves, uploads and loads")
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {', '.join(SIZES)}")
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    torch.set_num_threads(1)

    server = S3Server().start()
    try:
        import os

        os.environ.update(server.env)
        bucket = server.create_bucket("raylm-bench")
        with tempfile.TemporaryDirectory(prefix="raylm-bench-runs-") as local_root:
            rows = {name: measure(name, SIZES[name], {"local": local_root, "s3": f"{bucket}/runs"}, args.repeats)
                    for name in sizes}
    finally:
        server.stop()

    print(f"\ncheckpoint save, upload and load: local disk vs S3 on loopback (moto), median of {args.repeats}")
    print(f"{'model':<7}{'params':>10}{'MiB':>8}{'save s':>9}{'up local':>10}{'up S3':>8}{'load local':>12}"
          f"{'load S3':>9}{'S3/local save+up':>18}")
    fields = []
    for name, row in rows.items():
        local_total, s3_total = row["save"] + row["upload_local"], row["save"] + row["upload_s3"]
        print(f"{name:<7}{row['params'] / 1e6:>9.2f}M{row['bytes'] / 2**20:>8.1f}{row['save']:>9.3f}"
              f"{row['upload_local']:>10.3f}{row['upload_s3']:>8.3f}{row['load_local']:>12.3f}{row['load_s3']:>9.3f}"
              f"{s3_total / local_total:>18.2f}")
        fields += [f"{name}_save_s={row['save']:.3f}", f"{name}_upload_local_s={row['upload_local']:.3f}",
                   f"{name}_upload_s3_s={row['upload_s3']:.3f}", f"{name}_load_local_s={row['load_local']:.3f}",
                   f"{name}_load_s3_s={row['load_s3']:.3f}", f"{name}_s3_vs_local_save={s3_total / local_total:.2f}",
                   f"{name}_s3_vs_local_load={row['load_s3'] / row['load_local']:.2f}"]
    print("storage: " + " ".join(fields))


if __name__ == "__main__":
    main()

"""What a remote workspace costs: checkpoint save and load on a local disk against an S3 server on loopback.

For a tiny and a small model (the trainer's own `save_checkpoint` / `load_model`, DCP shards plus the JSON
files), side by side in one run: the save into a local folder (what a training step waits for when Ray
uploads in the background), the upload of that folder to its run storage (a local folder, or S3 through
pyarrow, which is what Ray Train's storage does), and the load back (download, verification, DCP load).
The S3 server is moto's server mode on 127.0.0.1 (`pip install 'moto[server]'`), so the figures measure
the S3 protocol path, not a network.

Then what training waits for: a real `raylm pretrain` trainer (Ray Train, 1 worker, the tiny model)
checkpointing every `--checkpoint-every` steps into a local folder and into the S3 bucket. The trainer
hands each checkpoint to Ray for a background upload, so a step waits for the local save only
(`checkpoint_wait_s`, median over the run's checkpoints); the plain alternative, a synchronous upload,
waits for the tiny model's save plus its S3 upload, measured above.

    python benchmarks/storage.py [--repeats 3] [--sizes tiny,small] [--train-steps 30]

Ends with one line: `storage: tiny_save_s=... tiny_upload_local_s=... tiny_upload_s3_s=... ...
train_wait_local_s=... train_wait_s3_s=... train_wait_s3_vs_local=... sync_wait_s3_s=...`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
import _repo  # noqa: F401,E402  (puts the repository root on sys.path)

import pyarrow.fs as pafs  # noqa: E402
import torch  # noqa: E402

from raylm.config import TrainConfig  # noqa: E402
from raylm.model import TransformerConfig, build_model  # noqa: E402
from raylm.model.sizing import parameter_count  # noqa: E402
from raylm.storage import filesystem_for  # noqa: E402
from raylm.train.checkpoint import load_model, local_checkpoint, save_checkpoint  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402
from tests.stdlib_corpus import stdlib_packed  # noqa: E402
from train import raylm_run  # noqa: E402  (benchmarks/train.py: the real trainer, its metrics read from MLflow)

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


def training_waits(storages: dict[str, str], steps: int, checkpoint_every: int) -> dict[str, float]:
    """Median `checkpoint_wait_s` of a real 1-worker pretraining run per storage (tiny model)."""
    import ray

    folder = Path(tempfile.mkdtemp(prefix="raylm-bench-storage-train-"))
    tiny = SIZES["tiny"]
    packed = stdlib_packed(folder / "data", tiny.seq_len, vocab_size=tiny.vocab_size)
    train = TrainConfig(workers=1, use_gpu=False, lr=1e-3, warmup_steps=2, max_steps=steps, micro_batch_size=4,
                        global_batch_size=8, eval_every=checkpoint_every, checkpoint_every=checkpoint_every,
                        report_every=checkpoint_every, keep_checkpoints=2)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        waits = {}
        for store, root in storages.items():
            history = raylm_run(tiny, train, packed, folder, f"wait-{store}", ("checkpoint_wait_s",),
                                storage=f"{root}/train")
            if not history["checkpoint_wait_s"]:
                raise RuntimeError(f"the {store} run reported no checkpoint_wait_s (no checkpoint before its last step?)")
            waits[store] = statistics.median(history["checkpoint_wait_s"])
    finally:
        ray.shutdown()
    return waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="median of this many saves, uploads and loads")
    parser.add_argument("--sizes", default="tiny,small", help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--train-steps", type=int, default=30, help="steps of each training run (0: none)")
    parser.add_argument("--checkpoint-every", type=int, default=5)
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    torch.set_num_threads(1)

    server = S3Server().start()
    try:
        os.environ.update(server.env)  # before Ray starts: its workers inherit the endpoint and credentials
        bucket = server.create_bucket("raylm-bench")
        with tempfile.TemporaryDirectory(prefix="raylm-bench-runs-") as local_root:
            rows = {name: measure(name, SIZES[name], {"local": local_root, "s3": f"{bucket}/runs"}, args.repeats)
                    for name in sizes}
            waits = (training_waits({"local": local_root, "s3": bucket}, args.train_steps, args.checkpoint_every)
                     if args.train_steps else {})
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
    if waits:
        sync = rows["tiny"]["save"] + rows["tiny"]["upload_s3"] if "tiny" in rows else None
        print("\nwhat a training step waits for at a checkpoint (tiny model, 1 worker, median over the run)")
        print(f"{'storage':<34}{'wait s':>8}")
        print(f"{'local folder, background upload':<34}{waits['local']:>8.3f}")
        print(f"{'S3, background upload (raylm)':<34}{waits['s3']:>8.3f}")
        if sync is not None:
            print(f"{'S3, synchronous save + upload':<34}{sync:>8.3f}")
        fields += [f"train_wait_local_s={waits['local']:.3f}", f"train_wait_s3_s={waits['s3']:.3f}",
                   f"train_wait_s3_vs_local={waits['s3'] / waits['local']:.2f}"]
        if sync is not None:
            fields.append(f"sync_wait_s3_s={sync:.3f}")
    print("storage: " + " ".join(fields))


if __name__ == "__main__":
    main()

"""Steady-state training throughput: `raylm pretrain`'s trainer against a plain PyTorch loop.

Same model, data (packed python-stdlib), global batch, micro-batch, optimizer and steps. The plain
loop runs in this process with one torch thread, like a Ray Train worker holding one CPU. Reported:
tokens/s of each (steady state: the first report window, which includes start-up and warm-up, is
dropped), their ratio (goal >= 0.95), 2 workers on 2 cores against 1 worker (no goal), and MFU on
this CPU (peak measured by a matmul).

    python benchmarks/train.py [--steps 60] [--d-model 128] [--layers 2] [--seq-len 128]

Ends with one line: `train: plain_tok_s=... raylm_1w_tok_s=... ratio_1w_vs_plain=... ...`.
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
from _plain_loop import plain_step  # noqa: E402

import torch  # noqa: E402

from raylm.artifacts import Packed  # noqa: E402
from raylm.config import TrainConfig  # noqa: E402
from raylm.model import Transformer, TransformerConfig  # noqa: E402
from raylm.model.sizing import flops_per_token  # noqa: E402
from raylm.train.data import PackedSequences  # noqa: E402
from raylm.train.launch import build_trainer  # noqa: E402
from raylm.train.mfu import peak_flops  # noqa: E402
from raylm.train.optim import build_optimizer  # noqa: E402
from tests.stdlib_corpus import stdlib_packed  # noqa: E402  (test and benchmark support, outside the package)


def plain_loop(model_cfg: TransformerConfig, train: TrainConfig, packed: Packed, report_every: int) -> list[float]:
    """tokens/s per window of `report_every` steps, one process, one thread."""
    torch.set_num_threads(1)
    torch.manual_seed(train.seed)
    config = model_cfg.for_tokenizer(packed.tokenizer.vocab_size)
    model = Transformer(config)
    optimizer = build_optimizer(model, train.lr, train.weight_decay, tuple(train.betas))
    data = PackedSequences(packed.train_uri)
    pad = packed.tokenizer.pad_id
    batch = train.global_batch_size
    rates, started = [], time.perf_counter()
    for step in range(train.max_steps):
        plain_step(model, optimizer, data, step, train, pad)
        if (step + 1) % report_every == 0:
            now = time.perf_counter()
            rates.append(report_every * batch * config.seq_len / (now - started))
            started = now
    return rates


def raylm_run(model_cfg: TransformerConfig, train: TrainConfig, packed: Packed, folder: Path, name: str,
              extra_metrics: tuple[str, ...] = (), storage: str | None = None) -> dict[str, list[float]]:
    """Per report window, tokens/s (and `extra_metrics`) of the real trainer, read back from its MLflow run.
    The run's checkpoints go under `storage` (default: `folder/runs`)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder}/mlflow.db"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench") or client.get_experiment(client.create_experiment("bench"))
    run_id = client.create_run(experiment.experiment_id, run_name=name).info.run_id
    result = build_trainer(model_cfg, train, packed, storage or str(folder / "runs"), name, uri, run_id).fit()
    if result.error:
        raise result.error
    return {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
            for key in ("tokens_per_s", *extra_metrics)}


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:]) if len(rates) > 1 else rates[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--report-every", type=int, default=10)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--micro", type=int, default=8)
    args = parser.parse_args()

    import ray

    folder = Path(tempfile.mkdtemp(prefix="raylm-bench-train-"))
    packed = stdlib_packed(folder / "data", args.seq_len, vocab_size=2048, corpus_bytes=1_500_000)
    model_cfg = TransformerConfig(d_model=args.d_model, n_layers=args.layers, n_heads=max(2, args.d_model // 64),
                                  seq_len=args.seq_len)
    common = dict(lr=1e-3, warmup_steps=10, max_steps=args.steps, micro_batch_size=args.micro,
                  global_batch_size=args.batch, eval_every=10**6, checkpoint_every=10**6,
                  report_every=args.report_every, use_gpu=False)

    plain = plain_loop(model_cfg, TrainConfig(workers=1, **common), packed, args.report_every)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    one = raylm_run(model_cfg, TrainConfig(workers=1, **common), packed, folder, "one")["tokens_per_s"]
    two = raylm_run(model_cfg, TrainConfig(workers=2, **common), packed, folder, "two")["tokens_per_s"]
    ray.shutdown()

    config = model_cfg.for_tokenizer(packed.tokenizer.vocab_size)
    torch.set_num_threads(1)
    peak = peak_flops(torch.device("cpu"), bf16=False)
    flops = flops_per_token(config)
    rows = [("plain PyTorch, 1 thread", steady(plain)), ("raylm pretrain, 1 worker", steady(one)),
            ("raylm pretrain, 2 workers", steady(two))]
    print(f"\nmodel d={args.d_model} layers={args.layers} seq={args.seq_len} vocab={config.vocab_size} "
          f"batch={args.batch} micro={args.micro} steps={args.steps}; CPU peak (1 thread, fp32 matmul) "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"{'run':<28}{'tokens/s':>12}{'MFU':>8}")
    for label, rate in rows:
        workers = 2 if "2 workers" in label else 1
        print(f"{label:<28}{rate:>12.0f}{flops * rate / workers / peak:>8.1%}")
    p, o, t = (r for _, r in rows)
    print(f"train: plain_tok_s={p:.0f} raylm_1w_tok_s={o:.0f} ratio_1w_vs_plain={o / p:.3f} raylm_2w_tok_s={t:.0f} "
          f"ratio_2w_vs_1w={t / o:.3f} mfu_1w={flops * o / peak:.3f} cpu_peak_gflops={peak / 1e9:.1f}")


if __name__ == "__main__":
    main()

"""The body of benchmarks/gpu_check.sh: gpt2-124m, bf16, flash SDPA, torch.compile, one GPU, via build_trainer.

Prints a table and ends with one line `gpu_check: tokens_per_s=... mfu=... gpu_mem_peak_gib=... ...`: steady
tokens/s and MFU of `raylm pretrain`'s trainer (Ray Train, one worker), and the worker's peak allocated GPU
memory against `raylm plan`'s estimate for the same setting. `--smoke` (or GPU_CHECK_SMOKE=1) runs a tiny
model on the CPU for a few steps, to test this script where there is no GPU.

    bash benchmarks/gpu_check.sh [--steps 300] [--micro 16] [--batch 32] [--no-compile] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _repo  # noqa: F401,E402  (puts the repository root on sys.path)

import torch  # noqa: E402

from raylm.config import TrainConfig  # noqa: E402
from raylm.model import TransformerConfig  # noqa: E402
from raylm.model.sizing import flops_per_token, parameter_count  # noqa: E402
from raylm.plan import memory_per_worker  # noqa: E402
from raylm.train.mfu import peak_flops  # noqa: E402
from tests.stdlib_corpus import stdlib_packed  # noqa: E402  (test and benchmark support, outside the package)
from train import raylm_run, steady  # noqa: E402  (benchmarks/train.py)


def gpt2_124m(smoke: bool):
    """The gpt2-124m preset when raylm.model has it; else its shape via config overrides."""
    if smoke:
        return TransformerConfig(d_model=64, n_layers=2, n_heads=2, seq_len=64)
    try:
        from raylm.model import preset

        return preset("gpt2-124m")
    except ImportError:  # older raylm.model without presets: GPT-2 small's sizes on the default block
        return TransformerConfig(d_model=768, n_layers=12, n_heads=12, seq_len=1024, ffn_hidden=3072)


def check_flash_attention() -> str:
    """Run one causal SDPA call with only the flash backend allowed (raises if flash cannot run)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 12, 1024, 64, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    return "flash"


def parse_args() -> argparse.Namespace:
    """Flags, each defaulting to its GPU_CHECK_* environment variable (the knobs gpu_check.sh documents)."""
    env = os.environ.get
    smoke = env("GPU_CHECK_SMOKE") == "1"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", default=smoke, help="tiny model on the CPU (GPU_CHECK_SMOKE=1)")
    parser.add_argument("--steps", type=int, default=int(env("GPU_CHECK_STEPS", 0)) or None,
                        help="optimizer steps (default 300; 20 with --smoke)")
    parser.add_argument("--micro", type=int, default=int(env("GPU_CHECK_MICRO", 0)) or None,
                        help="sequences per micro-batch (default 16; 4 with --smoke)")
    parser.add_argument("--batch", type=int, default=int(env("GPU_CHECK_BATCH", 0)) or None,
                        help="sequences per optimizer step (default 32; 8 with --smoke)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default on; off with --smoke)")
    args = parser.parse_args()
    if args.compile is None and env("GPU_CHECK_COMPILE") is not None:
        args.compile = env("GPU_CHECK_COMPILE") == "1"
    smoke = args.smoke
    args.steps = args.steps or (20 if smoke else 300)
    args.micro = args.micro or (4 if smoke else 16)
    args.batch = args.batch or (8 if smoke else 32)
    args.compile = (not smoke) if args.compile is None else args.compile
    return args


def main() -> None:
    import ray

    args = parse_args()
    smoke, steps, micro, batch, compile_model = args.smoke, args.steps, args.micro, args.batch, args.compile
    gpu = torch.cuda.is_available() and not smoke
    if not gpu and not smoke:
        sys.exit("gpu_check: no CUDA device; use --smoke (or GPU_CHECK_SMOKE=1) for the CPU smoke test")
    attention = check_flash_attention() if gpu else "cpu-math"

    model = gpt2_124m(smoke)
    seq_len = model.seq_len
    folder = Path(tempfile.mkdtemp(prefix="raylm-gpu-check-"))
    started = time.perf_counter()
    packed = stdlib_packed(folder / "data", seq_len, vocab_size=512 if smoke else 16384,
                           corpus_bytes=150_000 if smoke else 12_000_000)
    data_s = time.perf_counter() - started
    train = TrainConfig(workers=1, use_gpu=gpu, precision="bf16" if gpu else "fp32", compile=compile_model,
                        lr=6e-4, warmup_steps=min(50, steps // 4), max_steps=steps, micro_batch_size=micro,
                        global_batch_size=batch, eval_every=10**6, eval_sequences=micro,
                        checkpoint_every=10**6, report_every=max(5, steps // 10))
    ray.init(address="local", include_dashboard=False, log_to_driver=smoke is False,
             **({"num_cpus": 2} if smoke else {}))
    history = raylm_run(model, train, packed, folder, "gpu-check", extra_metrics=("gpu_mem_peak_gib",))
    ray.shutdown()
    rates = history["tokens_per_s"]

    config = model.for_tokenizer(packed.tokenizer.vocab_size)
    device = torch.device("cuda") if gpu else torch.device("cpu")
    peak = peak_flops(device, bf16=gpu)
    rate = steady(rates)
    utilisation = flops_per_token(config, seq_len) * rate / peak
    measured_gib = max(history.get("gpu_mem_peak_gib") or [float("nan")])
    planned_gib = memory_per_worker(config, "ddp", 1, micro, seq_len, bf16=gpu, checkpointing=False).total / 2**30
    name = torch.cuda.get_device_name() if gpu else "cpu (smoke)"
    print(f"\ndevice {name}; model {parameter_count(config).total / 1e6:.1f}M parameters, vocab {config.vocab_size}, "
          f"seq {seq_len}; batch {batch} x {seq_len} tokens, micro {micro}; compile={compile_model}; "
          f"attention={attention}; data prep {data_s:.0f} s")
    print("tokens/s per report window: " + " ".join(f"{r:.0f}" for r in rates))
    print(f"{'':<28}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}{'plan GiB':>10}")
    print(f"{'raylm pretrain, 1 worker':<28}{rate:>12.0f}{utilisation:>8.1%}{measured_gib:>10.2f}{planned_gib:>10.2f}")
    print(f"gpu_check: tokens_per_s={rate:.0f} mfu={utilisation:.3f} peak_tflops={peak / 1e12:.4g} "
          f"gpu_mem_peak_gib={measured_gib:.2f} plan_mem_gib={planned_gib:.2f} "
          f"mem_vs_plan={measured_gib / planned_gib:.2f} steps={steps} smoke={int(smoke)} goal_mfu=0.45 "
          f"meets_goal={int(utilisation >= 0.45)}")


if __name__ == "__main__":
    main()

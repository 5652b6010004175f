"""The body of benchmarks/gpu_check.sh: gpt2-124m, bf16, flash SDPA, torch.compile, one GPU, via build_trainer.

Prints a table and ends with one line `gpu_check: tokens_per_s=... mfu=... ...`. With GPU_CHECK_SMOKE=1
it runs a tiny model on CPU for a few steps, to test this script where there is no GPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from raylm.config import TrainConfig  # noqa: E402
from raylm.model import TransformerConfig  # noqa: E402
from raylm.model.sizing import flops_per_token, parameter_count  # noqa: E402
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


def main() -> None:
    import ray

    smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
    gpu = torch.cuda.is_available() and not smoke
    if not gpu and not smoke:
        sys.exit("gpu_check: no CUDA device; set GPU_CHECK_SMOKE=1 for the CPU smoke test")
    steps = int(os.environ.get("GPU_CHECK_STEPS", 20 if smoke else 300))
    micro = int(os.environ.get("GPU_CHECK_MICRO", 4 if smoke else 16))
    batch = int(os.environ.get("GPU_CHECK_BATCH", 8 if smoke else 32))
    compile_model = os.environ.get("GPU_CHECK_COMPILE", "0" if smoke else "1") == "1"
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
    rates = raylm_run(model, train, packed, folder, "gpu-check")
    ray.shutdown()

    config = model.for_tokenizer(packed.tokenizer.vocab_size)
    device = torch.device("cuda") if gpu else torch.device("cpu")
    peak = peak_flops(device, bf16=gpu)
    rate = steady(rates)
    utilisation = flops_per_token(config, seq_len) * rate / peak
    name = torch.cuda.get_device_name() if gpu else "cpu (smoke)"
    print(f"\ndevice {name}; model {parameter_count(config).total / 1e6:.1f}M parameters, vocab {config.vocab_size}, "
          f"seq {seq_len}; batch {batch} x {seq_len} tokens, micro {micro}; compile={compile_model}; "
          f"attention={attention}; data prep {data_s:.0f} s")
    print("tokens/s per report window: " + " ".join(f"{r:.0f}" for r in rates))
    print(f"gpu_check: tokens_per_s={rate:.0f} mfu={utilisation:.3f} peak_tflops={peak / 1e12:.4g} "
          f"steps={steps} smoke={int(smoke)} goal_mfu=0.45 meets_goal={int(utilisation >= 0.45)}")


if __name__ == "__main__":
    main()

"""Model FLOPs utilisation: achieved training FLOPs per second over the device's peak.

Training FLOPs per token come from `raylm.model.sizing.flops_per_token` (6N plus attention). The peak
is a datasheet figure for known GPUs (dense bf16, the table in raylm/gpus.py) and, on CPU or an unknown device, measured once per
process by timing a large matmul in the training dtype, so the figure means "fraction of what this
machine's matmul can do".
"""

from __future__ import annotations

import time

import torch

from raylm.gpus import known_gpu

_measured: dict[str, float] = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 1024,
                         repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a size x size matmul on `device`."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def peak_flops(device: torch.device, bf16: bool) -> float:
    key = f"{device}:{bf16}"
    if key not in _measured:
        peak = None
        if device.type == "cuda":
            gpu = known_gpu(torch.cuda.get_device_name(device))
            peak = gpu.peak_flops if gpu else None
            if peak is not None and not bf16:
                peak /= 2  # tf32 is about half of bf16 on these parts
        if peak is None:
            size = 4096 if device.type == "cuda" else 1024
            peak = measure_matmul_flops(device, torch.bfloat16 if bf16 else torch.float32, size)
        _measured[key] = peak
    return _measured[key]


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float) -> float:
    return flops_per_token * tokens_per_s_per_device / peak

"""The GPU types raylm knows: dense bf16 peak FLOP/s and memory, in one table.

`raylm plan` sizes runs with both (and `plan.gpu_types` in a config adds or overrides types); the
trainer's MFU divides by the peak of the GPU it runs on (raylm/train/mfu.py). Plain data, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class GpuType:
    name: str
    peak_flops: float  # dense (no sparsity) bf16 tensor-core peak, FLOP/s
    memory_bytes: float


GPU_TYPES = {gpu.name: gpu for gpu in (
    GpuType("H200", 989e12, 141 * GIB),
    GpuType("H100", 989e12, 80 * GIB),
    GpuType("A100", 312e12, 80 * GIB),
    GpuType("L40S", 362e12, 48 * GIB),
    GpuType("A10G", 125e12, 24 * GIB),
    GpuType("L4", 121e12, 24 * GIB),
    GpuType("RTX 4090", 165e12, 24 * GIB),
    GpuType("A6000", 155e12, 48 * GIB),
)}


def known_gpu(device_name: str) -> GpuType | None:
    """The table's entry for a device name such as 'NVIDIA H100 80GB HBM3' (None if unknown)."""
    return next((gpu for name, gpu in GPU_TYPES.items() if name in device_name), None)

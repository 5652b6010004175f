"""Wrapping the model for data parallelism: DDP replicas or FSDP2 shards, plus the per-step helpers.

`ddp`: every worker holds the whole model; gradients are averaged after the last micro-batch.
`fsdp`: FSDP2 `fully_shard` on each transformer block, then on the root, over a 1-D device mesh of
all workers; on GPU parameters compute in bf16 and gradients reduce in fp32. Both run on CPU with
gloo. `torch.compile` compiles modules in place (`Module.compile`), so parameter names, and with
them checkpoints, stay the same with or without it. (Activation checkpointing is the model's own
`activation_checkpointing` switch, which `train.activation_checkpointing` turns on.)
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The residual blocks (every module of class `Block`): the units FSDP2 shards one by one."""
    blocks = [m for m in model.modules() if type(m).__name__ == "Block"]
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no `Block` modules to shard")
    return blocks


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def wrap_model(model: nn.Module, strategy: str, device: torch.device, bf16: bool, compile_model: bool) -> nn.Module:
    if strategy == "ddp":
        # deferred: pulls in ray, slow to import; only this path needs it
        import ray.train.torch

        wrapped = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
        if compile_model:
            wrapped.compile()
        return wrapped
    if strategy != "fsdp":
        raise ValueError(f"train.strategy = {strategy!r}: expected 'ddp' or 'fsdp'")

    model.to(device)
    mesh = init_device_mesh(device.type, (world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in blocks_of(model):
        if compile_model:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (across shards for FSDP2) and return it before clipping."""
    parameters = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or math.inf)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)

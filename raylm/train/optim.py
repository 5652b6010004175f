"""Optimizers and learning-rate schedules.

AdamW with decoupled weight decay on matrices only (the default), or Muon for the 2-D weight matrices of
the transformer blocks with AdamW for everything else (embeddings, the output head, norms, biases), as
modded-nanogpt and nanochat train. Muon is `torch.optim.Muon` (momentum, then Newton-Schulz
orthogonalisation of each matrix's update); the two optimizers step as one `OptimizerSet`, which
`torch.distributed.checkpoint` saves and loads like a single optimizer (it takes a list of them).

Under DDP every replica holds the full, all-reduced gradient, so Muon's update is the same on every
worker. Under FSDP2 a worker holds a row shard of each matrix (a DTensor), and orthogonalising a shard is
not orthogonalising the matrix; `torch.optim.Muon` (torch 2.13) steps DTensors without complaint, but its
update differs from the unsharded one (tests/test_recipe.py's FSDP test fails with it). `GatheredMuon`
is the gather approach: the momentum stays sharded, each step all-gathers one matrix's update at a time,
orthogonalises the full matrix with torch's own Newton-Schulz and applies this worker's rows. It costs
one all-gather per matrix per step, and every worker orthogonalises every matrix (redundant compute, the
full matrix held briefly), which a sharding-aware Newton-Schulz would avoid.

Schedules: linear warmup, then a cosine decay to `min_ratio` of the peak at `total` steps, or
warmup-stable-decay (WSD, "trapezoidal"): the peak until the last `decay_fraction` of the steps, then a
linear cool-down to `min_ratio`. WSD's stable phase does not depend on the total, so a run can be
extended, or stopped early with a short cool-down, without retraining from the start.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate
# torch's own Newton-Schulz and learning-rate scaling (private names), so GatheredMuon's update is exactly
# torch.optim.Muon's on the gathered matrix
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from raylm.model.layers import Block

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")


def parameter_groups(model: nn.Module, weight_decay: float, exclude: Iterable[nn.Parameter] = ()) -> list[dict]:
    """Decay 2-D weights of linear layers; not norms, biases or embeddings (tied heads included).
    Parameters in `exclude` (Muon's) are left out."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], {id(p) for p in exclude}
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (decay if param.dim() >= 2 and id(param) not in embeddings else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weight matrices inside the transformer blocks (attention and feed-forward projections):
    not the token embedding, the output head (tied or not) or the learned position table."""
    chosen, seen = [], set()
    for block in (m for m in model.modules() if isinstance(m, Block)):  # FSDP2's wrapped class subclasses it
        for param in block.parameters():
            if param.requires_grad and param.dim() == 2 and id(param) not in seen:
                seen.add(id(param))
                chosen.append(param)
    return chosen


class GatheredMuon(torch.optim.Muon):
    """torch.optim.Muon for FSDP2's sharded (DTensor) matrices: sharded momentum, the update orthogonalised
    on the gathered full matrix, this worker's rows applied. On plain tensors: the same step as its parent."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                sharded = isinstance(update, DTensor)
                full = update.full_tensor() if sharded else update
                update = _zeropower_via_newtonschulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if sharded:  # Replicate -> the parameter's Shard placement: each worker keeps its rows, no traffic
                    mesh = param.device_mesh
                    update = DTensor.from_local(update, mesh, [Replicate()] * mesh.ndim,
                                                run_check=False).redistribute(mesh, param.placements)
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], param.shape))
        return loss


class OptimizerSet:
    """Several optimizers stepped as one. Iterating yields them, so `get_state_dict(model, optimizers)`
    (DCP) saves and loads their states together."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    optimizer: str = "adamw", muon_lr: float = 0.02,
                    muon_momentum: float = 0.95) -> torch.optim.AdamW | OptimizerSet:
    """AdamW on every parameter, or (`optimizer="muon"`) Muon on the blocks' matrices plus AdamW on the rest."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer = {optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
    if optimizer == "adamw":
        return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=lr, betas=betas, eps=1e-8)
    matrices = muon_parameters(model)
    sharded = any(hasattr(p, "device_mesh") for p in matrices)  # FSDP2's DTensors
    muon = (GatheredMuon if sharded else torch.optim.Muon)(matrices, lr=muon_lr, momentum=muon_momentum,
                                                           weight_decay=weight_decay, nesterov=True)
    groups = [group for group in parameter_groups(model, weight_decay, exclude=matrices) if group["params"]]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)  # DCP refuses empty groups beside another optimizer
    return OptimizerSet([muon, adamw])


def set_learning_rates(optimizer: torch.optim.Optimizer | OptimizerSet, multiplier: float, lr: float,
                       muon_lr: float) -> None:
    """Every group's learning rate: its optimizer's peak (Muon's groups `muon_lr`, the others `lr`) times
    the schedule's `multiplier`."""
    for group in optimizer.param_groups:
        group["lr"] = (muon_lr if "ns_steps" in group else lr) * multiplier


def learning_rate(step: int, peak: float, warmup: int, total: int | None, min_ratio: float,
                  schedule: str = "cosine", decay_fraction: float = 0.2) -> float:
    """Linear warmup to `peak`, then cosine decay (or WSD's stable peak and linear cool-down over the last
    `decay_fraction` of the steps) to `peak * min_ratio` at `total` steps. `total=None` (a minutes budget
    before its step count is fixed): the peak after warmup."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if total is None:
        return peak
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total))
        decay_start = max(warmup, total - decay_steps)
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return peak * (1 - (1 - min_ratio) * progress)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

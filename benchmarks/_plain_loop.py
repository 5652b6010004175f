"""One optimizer step of the plain single-process PyTorch loop that benchmarks/train.py and
benchmarks/overhead.py hold raylm's trainer against: the same schedule, batch order, micro-batching,
loss normalisation and clipping as raylm's worker, without Ray. Imports only torch and raylm's model
pieces, so the loop's start-up is the plain loop's own."""

from __future__ import annotations

import torch

from raylm.model.loss import split_inputs_targets, summed_loss
from raylm.train.optim import learning_rate


def plain_step(model, optimizer, data, step: int, train, pad: int) -> None:
    """Step `step` on the rows raylm's data order gives a single worker at that step."""
    batch, micro = train.global_batch_size, train.micro_batch_size
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, train.lr, train.warmup_steps, train.max_steps, train.min_lr_ratio)
    rows = torch.from_numpy(data.worker_rows(step * batch, batch, train.seed, 0, 1)).long()
    inputs, targets = split_inputs_targets(rows)
    count = max(float((targets != pad).sum()), 1.0)
    for start in range(0, batch, micro):
        loss, _ = summed_loss(model(inputs[start:start + micro]), targets[start:start + micro], pad)
        (loss / count).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

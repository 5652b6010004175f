"""The training loop each Ray Train worker runs.

One optimizer step consumes one global batch of `train.global_batch_size` sequences, whatever the
number of workers: worker r of w takes every w-th sequence, runs it in micro-batches (gradient sync on
the last one only), and the loss is normalised by the global number of target tokens, so the update
is the same on 1 worker or 8. Validation runs every `eval_every` steps on a fixed slice of the val
split; checkpoints (sharded, via DCP) every `checkpoint_every` steps and at the end.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from raylm.model import Transformer, TransformerConfig
from raylm.model.loss import bits_per_byte, loss_and_bytes, split_inputs_targets, summed_loss
from raylm.train.checkpoint import load_training_state, save_checkpoint
from raylm.train.data import PackedSequences
from raylm.train.optim import build_optimizer, learning_rate


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def autocast_context(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, rows: np.ndarray, micro_batch: int, pad_id: int,
             token_bytes: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Val loss (nats per target token) and bits-per-byte over `rows`, summed across workers."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    for start in range(0, len(rows), micro_batch):
        batch = torch.from_numpy(rows[start:start + micro_batch]).long().to(device)
        inputs, targets = split_inputs_targets(batch)
        with autocast_context(device):
            logits = model(inputs)
        for index, value in enumerate(loss_and_bytes(logits, targets, pad_id, token_bytes)):
            sums[index] += value
    nll, count, nll_bytes, n_bytes = _all_reduce(sums, device)
    model.train(was_training)
    return {"val_loss": nll / max(count, 1), "val_bpb": bits_per_byte(nll_bytes, int(n_bytes))}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from raylm.data.tokenizer import token_byte_lengths, tokenizer_from_json
    from raylm.tracking import RunLogger

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train_cfg = config["train"]
    pad_id = config["pad_id"]
    torch.manual_seed(train_cfg["seed"] + rank)

    model_config = TransformerConfig.from_dict(config["model"])
    model = ray.train.torch.prepare_model(Transformer(model_config), parallel_strategy="ddp")
    optimizer = build_optimizer(model, train_cfg["lr"], train_cfg["weight_decay"], tuple(train_cfg["betas"]))

    state = {"step": 0, "tokens_seen": 0, "data_position": 0, "best_val_loss": math.inf,
             "evals_without_improvement": 0, "restarts": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state.update(load_training_state(directory, model, optimizer, rank))
        state["restarts"] += 1
    elif config.get("init_checkpoint"):
        load_training_state(config["init_checkpoint"], model, None, rank)

    train_data = PackedSequences(config["train_uri"])
    val_rows = PackedSequences(config["val_uri"]).rows[: train_cfg["eval_sequences"]][rank::world]
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer_from_json(config["tokenizer_json"]))).to(device)
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        if logger:
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step=state["step"])
            logger.flush()
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        directory = tempfile.mkdtemp(prefix=f"raylm-step{state['step']}-rank{rank}-")
        try:
            save_checkpoint(directory, model, optimizer, dict(state), config["model"], config["tokenizer_json"], rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_{state['step']:07d}")
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    if state["step"] == 0 and checkpoint is None:
        initial = evaluate(model, val_rows, train_cfg["micro_batch_size"], pad_id, token_bytes, device)
        state["val_loss_initial"] = initial["val_loss"]
        report({"step": 0, **initial, "workers": world}, with_checkpoint=False)

    global_batch, micro = train_cfg["global_batch_size"], train_cfg["micro_batch_size"]
    max_steps = train_cfg["max_steps"]
    window = {"loss": 0.0, "tokens": 0, "steps": 0, "started": time.perf_counter()}
    model.train()
    while state["step"] < max_steps:
        step = state["step"]
        lr = learning_rate(step, train_cfg["lr"], train_cfg["warmup_steps"], max_steps, train_cfg["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr

        rows = torch.from_numpy(train_data.worker_rows(state["data_position"], global_batch, train_cfg["seed"],
                                                       rank, world)).long().to(device)
        inputs, targets = split_inputs_targets(rows)
        global_targets = _all_reduce([float((targets != pad_id).sum())], device)[0]
        step_loss = 0.0
        chunks = range(0, len(rows), micro)
        for index, start in enumerate(chunks):
            last = index == len(chunks) - 1
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync, autocast_context(device):
                logits = model(inputs[start:start + micro])
                loss_sum, _ = summed_loss(logits, targets[start:start + micro], pad_id)
                (loss_sum * world / global_targets).backward()
            step_loss += float(loss_sum.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg["grad_clip"] or math.inf))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        state["step"] += 1
        state["data_position"] += global_batch
        state["tokens_seen"] += int(global_targets)
        window["loss"] += _all_reduce([step_loss], device)[0] / global_targets
        window["tokens"] += global_targets
        window["steps"] += 1

        step = state["step"]
        done = step >= max_steps
        evaluate_now = step % train_cfg["eval_every"] == 0 or done
        checkpoint_now = step % train_cfg["checkpoint_every"] == 0 or done
        if not (evaluate_now or checkpoint_now or step % train_cfg["report_every"] == 0):
            continue

        elapsed = time.perf_counter() - window["started"]
        metrics = {"step": step, "loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": window["tokens"] / elapsed, "step_time_s": elapsed / window["steps"],
                   "tokens_seen": state["tokens_seen"], "workers": world, "restarts": state["restarts"],
                   "val_loss_initial": state.get("val_loss_initial", math.nan)}
        if evaluate_now:
            metrics.update(evaluate(model, val_rows, micro, pad_id, token_bytes, device))
            if metrics["val_loss"] < state["best_val_loss"]:
                state["best_val_loss"], state["evals_without_improvement"] = metrics["val_loss"], 0
            else:
                state["evals_without_improvement"] += 1
            patience = train_cfg.get("early_stopping_patience")
            if patience and state["evals_without_improvement"] >= patience:
                metrics["early_stopped"] = 1
                done = checkpoint_now = True
        report(metrics, with_checkpoint=checkpoint_now)
        window = {"loss": 0.0, "tokens": 0, "steps": 0, "started": time.perf_counter()}
        if done:
            break

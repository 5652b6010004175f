"""The training loop each Ray Train worker runs.

One optimizer step consumes one global batch of a fixed number of sequences (`train.global_batch_size`,
or `train.global_batch_tokens / seq_len`), whatever the number of workers: worker r of w takes every
w-th sequence and runs its share in micro-batches of `micro_batch_size` (gradient accumulation, so the
number of accumulation steps follows the current worker count; gradients sync on the last one only),
and the loss is normalised by the global number of target tokens, so the update is the same on 1
worker or 8, and after an elastic resize. Validation every `eval_every` steps on a fixed slice of the
val split (loss and bits-per-byte), early stopping after `early_stopping_patience` evaluations without
improvement, checkpoints (sharded, via DCP) every `checkpoint_every` steps and at the end.

Loop config contract (see `launch.build_trainer`): reports carry at least `loss, val_loss, val_bpb,
lr, step, tokens_seen`; `init_checkpoint` loads model weights only; a `finetune` key calls
`raylm.finetune.prepare_for_finetune(model, config["finetune"])` before wrapping, and the optimizer
takes only parameters with `requires_grad`; shards with a `loss_mask` column count only masked-in targets.
An encoder-decoder trains on `model.seq2seq_objective`; span corruption seeds each row from (train.seed,
its position in the data stream), so resuming, or another worker count, corrupts the same rows alike.
"""

from __future__ import annotations

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

from raylm.model import TransformerConfig, build_model
from raylm.model.loss import bits_per_byte, lm_batch, loss_and_bytes, summed_loss
from raylm.model.sizing import flops_per_token
from raylm.model.span_corruption import row_seeds
from raylm.train.checkpoint import load_training_state, newest_good_checkpoint, save_checkpoint
from raylm.train.data import PackedSequences
from raylm.train.mfu import mfu, peak_flops
from raylm.train.optim import build_optimizer, learning_rate
from raylm.train.parallel import clip_gradients, gradient_sync, wrap_model


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def autocast_context(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


@torch.no_grad()
def evaluate(model: torch.nn.Module, model_config: TransformerConfig, rows: np.ndarray, mask: np.ndarray | None,
             micro_batch: int, pad_id: int, token_bytes: torch.Tensor, device: torch.device,
             bf16: bool = False) -> dict[str, float]:
    """Val loss (nats per target token) and bits-per-byte over `rows`, summed across workers. Always on
    the prefix objective (an encoder-decoder trained by span corruption too): bits-per-byte needs each
    target to be the next text token, and the figures stay comparable across objectives and runs."""
    was_training = model.training
    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]
    for start in range(0, len(rows), micro_batch):
        batch = torch.from_numpy(rows[start:start + micro_batch]).long().to(device)
        batch_mask = None if mask is None else torch.from_numpy(mask[start:start + micro_batch]).to(device)
        inputs, targets = lm_batch(batch, model_config, loss_mask=batch_mask, ignore_id=pad_id, objective="prefix")
        with autocast_context(device, bf16):
            logits = model(**inputs)
        for index, value in enumerate(loss_and_bytes(logits, targets, pad_id, token_bytes)):
            sums[index] += value
    nll, count, nll_bytes, n_bytes = _all_reduce(sums, device)
    model.train(was_training)
    return {"val_loss": nll / max(count, 1), "val_bpb": bits_per_byte(nll_bytes, int(n_bytes))}


def stop_requested(stop_uri: str | None, device: torch.device) -> bool:
    """True on every worker once the run's STOP file exists (agreed through an all-reduce)."""
    if not stop_uri:
        return False
    import pyarrow.fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(stop_uri if "://" in stop_uri else "file://" + stop_uri)
    exists = float(filesystem.get_file_info(path).type == pafs.FileType.File)
    return _all_reduce([exists], device)[0] > 0


def resume_checkpoint() -> tuple[str | None, list[str]]:
    """The newest verified checkpoint of this run (skipping corrupted newer ones), and what was refused."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None, []
    return newest_good_checkpoint(checkpoint.path, checkpoint.filesystem)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from raylm.data.tokenizer import token_byte_lengths, tokenizer_from_json
    from raylm.tracking import RunLogger

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    train_cfg = config["train"]
    pad_id = config["pad_id"]
    bf16 = use_bf16(train_cfg.get("precision", "auto"), device)
    torch.manual_seed(train_cfg["seed"])  # identical initial weights on every worker
    if train_cfg.get("deterministic"):
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    model_config = TransformerConfig.from_dict(config["model"])
    model = build_model(model_config)
    resume_path, refusals = resume_checkpoint()
    if resume_path is None and config.get("init_checkpoint"):
        from raylm.train.checkpoint import local_checkpoint

        with local_checkpoint(config["init_checkpoint"]) as directory:
            source = load_training_state(directory, model, None, rank)
        expected = config.get("tokenizer_fingerprint")
        if expected and source.get("tokenizer_fingerprint") not in (None, expected):
            raise ValueError(f"--from {config['init_checkpoint']}: trained with tokenizer {source['tokenizer_fingerprint']}, "
                             f"but this run's data is tokenized by {expected}")
    if config.get("finetune") is not None:
        from raylm.finetune import prepare_for_finetune

        model = prepare_for_finetune(model, config["finetune"])
    model = wrap_model(model, train_cfg.get("strategy", "ddp"), device, bf16, bool(train_cfg.get("compile")))
    optimizer = build_optimizer(model, train_cfg["lr"], train_cfg["weight_decay"], tuple(train_cfg["betas"]))

    state = {"step": 0, "tokens_seen": 0, "data_position": 0, "best_val_loss": math.inf,
             "evals_without_improvement": 0, "restarts": 0, "val_loss": math.nan, "val_bpb": math.nan,
             "model_config": config["model"], "tokenizer_fingerprint": config.get("tokenizer_fingerprint")}
    torch.manual_seed(train_cfg["seed"] * 1000 + 1 + rank)  # per-worker stream (dropout); a checkpoint restores it
    if resume_path is not None:
        with ray.train.Checkpoint(resume_path, ray.train.get_checkpoint().filesystem).as_directory() as directory:
            state.update(load_training_state(directory, model, optimizer, rank))
        state["restarts"] += 1

    train_data = PackedSequences(config["train_uri"])
    val_data = PackedSequences(config["val_uri"])
    val_rows = val_data.rows[: train_cfg["eval_sequences"]][rank::world]
    val_mask = None if val_data.mask is None else val_data.mask[: train_cfg["eval_sequences"]][rank::world]
    token_bytes = torch.from_numpy(token_byte_lengths(tokenizer_from_json(config["tokenizer_json"]))).to(device)
    logger = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 and config.get("run_id") else None

    global_batch = int(config.get("global_batch_sequences") or train_cfg["global_batch_size"])
    micro = train_cfg["micro_batch_size"]
    local_batch = len(range(rank, global_batch, world))
    accumulation = math.ceil(local_batch / micro)
    max_steps = train_cfg["max_steps"]
    seq_len = model_config.seq_len
    flops = flops_per_token(model_config, seq_len)
    peak = peak_flops(device, bf16)

    def report(metrics: dict[str, float], with_checkpoint: bool) -> None:
        if logger:  # MLflow gets val figures when they are measured; Ray (Tune) gets the latest every time
            logger.log({k: v for k, v in metrics.items() if k != "step"}, step=state["step"])
            logger.flush()
        metrics = {**metrics, "val_loss": state["val_loss"], "val_bpb": state["val_bpb"]}
        if not with_checkpoint:
            ray.train.report(metrics)
            return
        directory = tempfile.mkdtemp(prefix=f"raylm-step{state['step']}-rank{rank}-")
        try:
            save_checkpoint(directory, model, optimizer, dict(state), config["model"], config["tokenizer_json"], rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_{state['step']:07d}_r{state['restarts']:03d}")
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def run_evaluation(track: bool = True) -> None:
        figures = evaluate(model, model_config, val_rows, val_mask, micro, pad_id, token_bytes, device, bf16)
        state.update(figures)
        if not track:  # the untrained baseline neither counts as best nor against patience
            return
        if figures["val_loss"] < state["best_val_loss"]:
            state["best_val_loss"], state["evals_without_improvement"] = figures["val_loss"], 0
        else:
            state["evals_without_improvement"] += 1

    base = {"workers": world, "grad_accum_steps": accumulation, "restarts": state["restarts"],
            "checkpoints_refused": len(refusals), "resumed_from_step": state["step"] if resume_path else -1}
    if state["step"] == 0 and resume_path is None:
        run_evaluation(track=False)
        state["val_loss_initial"] = state["val_loss"]
        report({"step": 0, "loss": math.nan, "lr": 0.0, "tokens_seen": 0, "val_loss": state["val_loss"],
                "val_bpb": state["val_bpb"], **base}, with_checkpoint=False)

    window = {"loss": 0.0, "tokens": 0, "steps": 0, "started": time.perf_counter()}
    model.train()
    lr = learning_rate(state["step"], train_cfg["lr"], train_cfg["warmup_steps"], max_steps, train_cfg["min_lr_ratio"])
    grad_norm = math.nan
    done = state["step"] >= max_steps
    while not done:
        step = state["step"]
        lr = learning_rate(step, train_cfg["lr"], train_cfg["warmup_steps"], max_steps, train_cfg["min_lr_ratio"])
        for group in optimizer.param_groups:
            group["lr"] = lr

        rows, mask = train_data.worker_batch(state["data_position"], global_batch, train_cfg["seed"], rank, world)
        positions = train_data.worker_positions(state["data_position"], global_batch, rank, world)
        inputs, targets = lm_batch(torch.from_numpy(rows).long().to(device), model_config,
                                   loss_mask=None if mask is None else torch.from_numpy(mask).to(device), ignore_id=pad_id,
                                   seeds=row_seeds(train_cfg["seed"], positions))
        global_targets = max(_all_reduce([float((targets != pad_id).sum())], device)[0], 1.0)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: one sync per step
        for index, start in enumerate(range(0, len(targets), micro)):
            with gradient_sync(model, sync=index == accumulation - 1), autocast_context(device, bf16):
                logits = model(**{name: value[start:start + micro] for name, value in inputs.items()})
                loss_sum, _ = summed_loss(logits, targets[start:start + micro], pad_id)
                (loss_sum * world / global_targets).backward()
            step_loss += loss_sum.detach().double()
        grad_norm = clip_gradients(model, train_cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        state["step"] += 1
        state["data_position"] += global_batch
        state["tokens_seen"] += global_batch * seq_len
        step_mean_loss = _all_reduce([float(step_loss)], device)[0] / global_targets
        window["loss"] += step_mean_loss
        if logger:
            logger.log({"step_loss": step_mean_loss}, step=state["step"])
        window["tokens"] += global_batch * seq_len
        window["steps"] += 1

        step = state["step"]
        if config.get("fail_at_step") == step and state["restarts"] == 0:  # fault injection (tests, drills)
            raise RuntimeError(f"injected failure at step {step} (loop config fail_at_step)")
        done = step >= max_steps
        evaluate_now = step % train_cfg["eval_every"] == 0 or done
        checkpoint_now = step % train_cfg["checkpoint_every"] == 0 or done
        if not (evaluate_now or checkpoint_now or step % train_cfg["report_every"] == 0):
            continue

        elapsed = time.perf_counter() - window["started"]
        tokens_per_s = window["tokens"] / elapsed
        metrics = {"step": step, "loss": window["loss"] / window["steps"], "lr": lr, "grad_norm": grad_norm,
                   "tokens_per_s": tokens_per_s, "step_time_s": elapsed / window["steps"],
                   "mfu": mfu(flops, tokens_per_s / world, peak), "tokens_seen": state["tokens_seen"],
                   "val_loss_initial": state.get("val_loss_initial", math.nan), **base}
        if stop_requested(config.get("stop_uri"), device):
            metrics["stopped"] = 1
            done = evaluate_now = checkpoint_now = True
        if evaluate_now:
            run_evaluation()
            metrics.update(evaluated=1, val_loss=state["val_loss"], val_bpb=state["val_bpb"])
            patience = train_cfg.get("early_stopping_patience")
            if patience and state["evals_without_improvement"] >= patience:
                metrics["early_stopped"] = 1
                done = checkpoint_now = True
        report(metrics, with_checkpoint=checkpoint_now)
        window = {"loss": 0.0, "tokens": 0, "steps": 0, "started": time.perf_counter()}

    if resume_path is not None and base["resumed_from_step"] >= max_steps:
        # resumed an already finished run: evaluate and checkpoint again (e.g. on a new worker count)
        run_evaluation()
        report({"step": state["step"], "loss": math.nan, "lr": lr, "tokens_seen": state["tokens_seen"],
                "evaluated": 1, "val_loss": state["val_loss"], "val_bpb": state["val_bpb"], **base},
               with_checkpoint=True)

"""The training loop each Ray Train worker runs: a `LoopConfig` in, a small `Trainer` over it.

One optimizer step consumes one global batch of a fixed number of sequences (`train.global_batch_size`,
or `train.global_batch_tokens / seq_len`), whatever the number of workers: worker r of w takes every
w-th sequence and runs its share in micro-batches of `micro_batch_size` (gradient accumulation, so the
number of accumulation steps follows the current worker count; gradients sync on the last one only),
and the loss is normalised by the global number of target tokens, so the update is the same on 1
worker or 8, and after an elastic resize. Validation every `eval_every` steps on a fixed slice of the
val split (loss and bits-per-byte; also at step 0 with `train.eval_at_start`), early stopping after
`early_stopping_patience` evaluations without improvement, checkpoints (sharded, via DCP) every
`checkpoint_every` steps and at the end.

The loop reads top to bottom (`Trainer.run`): step, then at a report point evaluate and maybe
checkpoint. The last step (max_steps reached, a STOP file, early stopping) takes the same path as
the periodic ones, only forced (nanochat's `last_step`); a run resumed after it had finished goes
straight to that last step, so it evaluates and checkpoints again (e.g. on a new worker count).

Contract (see `launch.build_trainer`): reports carry at least `loss, val_loss, val_bpb, lr, step,
tokens_seen`; `init_checkpoint` loads model weights only; a `finetune` spec calls
`raylm.finetune.prepare_for_finetune(model, spec)` before wrapping, and the optimizer takes only
parameters with `requires_grad`; shards with a `loss_mask` column count only masked-in targets.
An encoder-decoder trains on `model.seq2seq_objective`; span corruption seeds each row from (train.seed,
its position in the data stream), so resuming, or another worker count, corrupts the same rows alike.
"""

from __future__ import annotations

import logging
import math
import resource
import shutil
import sys
import tempfile
import time
import uuid
from typing import Any, Iterator

import numpy as np
import psutil
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointUploadMode
import torch
import torch.distributed as dist

from raylm.data.tokenizer import token_byte_lengths, tokenizer_from_json
from raylm.finetune import prepare_for_finetune
from raylm.model import TransformerConfig, build_model
from raylm.model.loss import bits_per_byte, lm_batch, loss_and_bytes, summed_loss
from raylm.model.sizing import flops_per_token
from raylm.model.span_corruption import row_seeds
from raylm.tracking import RunLogger
from raylm.train.checkpoint import CheckpointError, good_checkpoints, load_training_state, local_checkpoint, save_checkpoint
from raylm.train.data import PackedSequences
from raylm.train.mfu import mfu, peak_flops
from raylm.train.budget import steps_for_minutes
from raylm.train.optim import build_optimizer, learning_rate, set_learning_rates
from raylm.train.parallel import clip_gradients, gradient_sync, wrap_model
from raylm.train.loop_config import LoopConfig

log = logging.getLogger("raylm")


# Figures every report carries for Ray (and Tune) that stay the same for a worker group's life. Charted in
# MLflow at every report they draw flat lines over the real curves, so they go there only at the first
# report after a restart (when they are news: the new worker count, the restart, refused checkpoints); the
# stage's summary at the last step has them too. `evaluated` only marks a report for the best-checkpoint
# callback.
STEADY_FIGURES = frozenset({"workers", "grad_accum_steps", "restarts", "checkpoints_refused", "resumed_from_step",
                            "rss_before_data_gib"})
NOT_CHARTED = frozenset({"step", "evaluated"})


def charted_figures(metrics: dict[str, float], with_steady: bool) -> dict[str, float]:
    """The figures of one report that go to the MLflow run (`with_steady`: the steady ones too)."""
    return {key: value for key, value in metrics.items()
            if key not in NOT_CHARTED and (with_steady or key not in STEADY_FIGURES)}


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


def device_memory_metrics(device: torch.device) -> dict[str, float]:
    """Peak allocated GPU memory since the worker started, in GiB (nothing on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"gpu_mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def resident_memory_gib() -> float:
    """This process's resident memory now, in GiB."""
    return psutil.Process().memory_info().rss / 2**30


def host_memory_metrics() -> dict[str, float]:
    """The most resident memory this worker process has held since it started, in GiB (getrusage's
    ru_maxrss: the kernel's own high-water mark, so no peak between two reports is missed)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"rss_peak_gib": peak / 2**30}


def stop_requested(stop_uri: str | None, device: torch.device) -> bool:
    """True on every worker once the run's STOP file exists (agreed through an all-reduce)."""
    if not stop_uri:
        return False
    filesystem, path = pafs.FileSystem.from_uri(stop_uri if "://" in stop_uri else "file://" + stop_uri)
    exists = float(filesystem.get_file_info(path).type == pafs.FileType.File)
    return _all_reduce([exists], device)[0] > 0


def run_checkpoint_folder() -> tuple[pafs.FileSystem, str]:
    """Where this run's checkpoints are: the folder of Ray's latest one, or the run's when Ray has none."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        return checkpoint.filesystem, checkpoint.path.rstrip("/").rsplit("/", 1)[0]
    storage = ray.train.get_context().get_storage()
    return storage.storage_filesystem, storage.experiment_fs_path


def assigned_cpus() -> float:
    """The CPUs Ray reserved for this worker (0 when it asked for none, e.g. a GPU worker by default)."""
    return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))


def worker_group_token(rank: int) -> str:
    """A short id shared by this worker group (rank 0's, broadcast), so that no two groups of one run
    write into the same checkpoint folder."""
    token = [uuid.uuid4().hex[:6] if rank == 0 else None]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


class Trainer:
    """One worker's model, optimizer, data and trainer state, and what the loop does with them."""

    def __init__(self, config: LoopConfig):
        self.config, self.train = config, config.train
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.checkpoint_wait_s: float | None = None  # the last checkpoint's save time, for the next report
        self.device = ray.train.torch.get_device()
        if config.torch_threads is not None:
            torch.set_num_threads(config.torch_threads)
        self.bf16 = use_bf16(self.train.precision, self.device)
        torch.manual_seed(self.train.seed)  # identical initial weights on every worker
        if self.train.deterministic:
            torch.use_deterministic_algorithms(True)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        model = build_model(config.model)
        self.refusals: list[str] = []
        self.checkpoint_fs, run_folder = run_checkpoint_folder()
        candidates = good_checkpoints(run_folder, self.checkpoint_fs, self.refusals)  # newest first, lazily
        self.resume_path = next(candidates, None)
        if self.resume_path is None and ray.train.get_checkpoint() is not None:
            raise CheckpointError(f"no usable checkpoint to resume from: {'; '.join(self.refusals)}")
        self.group = worker_group_token(self.rank)
        if self.resume_path is None and config.init_checkpoint:
            self._load_init_weights(model)
        if config.finetune is not None:
            model = prepare_for_finetune(model, config.finetune)
        self.model = wrap_model(model, self.train.strategy, self.device, self.bf16, self.train.compile)
        self.optimizer = build_optimizer(self.model, self.train.lr, self.train.weight_decay, tuple(self.train.betas),
                                         self.train.optimizer, self.train.muon_lr, self.train.muon_momentum)

        self.state: dict[str, Any] = {
            "step": 0, "tokens_seen": 0, "data_position": 0, "best_val_loss": math.inf,
            "evals_without_improvement": 0, "restarts": 0, "val_loss": math.nan, "val_bpb": math.nan,
            "budget_max_steps": None,
            "model_config": config.model.to_dict(), "tokenizer_fingerprint": config.tokenizer_fingerprint}
        torch.manual_seed(self.train.seed * 1000 + 1 + self.rank)  # per-worker stream (dropout); a checkpoint restores it
        if self.resume_path is not None:
            self._load_resume_state(candidates)

        self.token_bytes = torch.from_numpy(token_byte_lengths(tokenizer_from_json(config.tokenizer_json))).to(self.device)
        self.logger = RunLogger(config.tracking_uri, config.run_id) if self.rank == 0 and config.run_id else None
        rss_before_data = resident_memory_gib()  # what reading the data adds is rss_peak_gib minus this
        self.train_data = PackedSequences(config.train_uri)
        val_data = PackedSequences(config.val_uri)
        held_out = np.arange(min(self.train.eval_sequences, len(val_data)))  # the fixed slice, this worker's share
        self.val_rows, self.val_mask = val_data.take(held_out[self.rank::self.world])

        self.global_batch = config.global_batch_sequences
        self.accumulation = math.ceil(len(range(self.rank, self.global_batch, self.world)) / self.train.micro_batch_size)
        self.flops = flops_per_token(config.model, config.model.seq_len)
        self.peak = peak_flops(self.device, self.bf16)
        self.lr = self._learning_rate()
        self.grad_norm = math.nan
        self.timed_steps: list[float] = []  # a minutes budget: durations of the steps it measures
        self.base = {"workers": self.world, "grad_accum_steps": self.accumulation, "restarts": self.state["restarts"],
                     "cpus_per_worker": assigned_cpus(), "torch_threads": torch.get_num_threads(),
                     "checkpoints_refused": len(self.refusals),
                     "resumed_from_step": self.state["step"] if self.resume_path else -1,
                     "rss_before_data_gib": rss_before_data}
        self.window: dict[str, float] = {}
        self.steady_charted = False

    def _load_resume_state(self, candidates: Iterator[str]) -> None:
        """Load the newest verified checkpoint; one that verifies but cannot be read (a refused pickle, a
        shard DCP rejects) is counted as refused and the next older one is tried."""
        while self.resume_path is not None:
            try:
                with ray.train.Checkpoint(self.resume_path, self.checkpoint_fs).as_directory() as directory:
                    self.state.update(load_training_state(directory, self.model, self.optimizer, self.rank))
                self.state["restarts"] += 1
                return
            except CheckpointError as error:
                log.warning("refusing checkpoint: %s", error)
                self.refusals.append(str(error))
                self.resume_path = next(candidates, None)
        raise CheckpointError(f"no usable checkpoint to resume from: {'; '.join(self.refusals)}")

    def _load_init_weights(self, model: torch.nn.Module) -> None:
        source = self.config.init_checkpoint
        with local_checkpoint(source) as directory:
            state = load_training_state(directory, model, None, self.rank)
        expected = self.config.tokenizer_fingerprint
        if expected and state.get("tokenizer_fingerprint") not in (None, expected):
            raise ValueError(f"--from {source}: trained with tokenizer {state['tokenizer_fingerprint']}, "
                             f"but this run's data is tokenized by {expected}")

    # ------------------------------------------------------------------------------------------
    # The loop

    def run(self) -> None:
        if self.state["step"] == 0 and self.resume_path is None and self.train.eval_at_start:
            self.report_baseline()
        self.model.train()
        self._open_window()
        while True:
            if not self.finished:
                self.step()
            last_step = self.finished
            if not (last_step or self.due(self.train.eval_every) or self.due(self.train.checkpoint_every)
                    or self.due(self.train.report_every)):
                continue
            metrics = self.window_metrics()
            if stop_requested(self.config.stop_uri, self.device):
                metrics["stopped"] = 1
                last_step = True
            if last_step or self.due(self.train.eval_every):
                metrics.update(self.evaluate())
                if self.patience_exhausted():
                    metrics["early_stopped"] = 1
                    last_step = True
            self.maybe_checkpoint(metrics, last_step)
            if last_step:
                return

    @property
    def minutes_budget(self) -> bool:
        return self.train.budget is not None and self.train.budget.kind == "minutes"

    @property
    def max_steps(self) -> int | None:
        """The run's step count: train.max_steps (fixed by a FLOPs / tokens budget at launch), or what a
        minutes budget fixed once measured (None before; kept in the trainer state, so in checkpoints)."""
        return self.state.get("budget_max_steps") if self.minutes_budget else self.train.max_steps

    @property
    def finished(self) -> bool:
        return self.max_steps is not None and self.state["step"] >= self.max_steps

    def _time_for_minutes_budget(self, seconds: float) -> None:
        """A minutes budget: time `measure_steps` steps (not the first of this process), then fix the step
        count from the workers' mean speed."""
        budget = self.train.budget
        if not self.minutes_budget or self.state.get("budget_max_steps") is not None:
            return
        self.timed_steps.append(seconds)
        if len(self.timed_steps) < budget.measure_steps + 1:
            return
        timed = self.timed_steps[1:]  # the first step pays for start-up (allocation, compilation)
        per_step = _all_reduce([sum(timed) / len(timed)], self.device)[0] / self.world  # the same on every worker
        steps = steps_for_minutes(budget.minutes, self.state["step"], per_step)
        self.state["budget_max_steps"] = steps
        log.info("train.budget.minutes = %g: %.3f s per step over %d steps, fixing the run at %d steps",
                 budget.minutes, per_step, len(timed), steps)
        if self.logger:
            self.logger.log({"budget_max_steps": steps, "budget_seconds_per_step": per_step}, step=self.state["step"])

    def due(self, every: int) -> bool:
        return self.state["step"] % every == 0

    # ------------------------------------------------------------------------------------------
    # Its three moves

    def step(self) -> None:
        """One optimizer step on one global batch (this worker's share, in micro-batches)."""
        started = time.perf_counter()
        self.lr = self._learning_rate()
        set_learning_rates(self.optimizer, self.lr / self.train.lr, self.train.lr, self.train.muon_lr)
        pad_id, micro, device = self.config.pad_id, self.train.micro_batch_size, self.device
        position = self.state["data_position"]
        rows, mask = self.train_data.worker_batch(position, self.global_batch, self.train.seed, self.rank, self.world)
        positions = self.train_data.worker_positions(position, self.global_batch, self.rank, self.world)
        inputs, targets = lm_batch(torch.from_numpy(rows).long().to(device), self.config.model,
                                   loss_mask=None if mask is None else torch.from_numpy(mask).to(device),
                                   ignore_id=pad_id, seeds=row_seeds(self.train.seed, positions))
        global_targets = max(_all_reduce([float((targets != pad_id).sum())], device)[0], 1.0)
        step_loss = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: one sync per step
        for index, start in enumerate(range(0, len(targets), micro)):
            with gradient_sync(self.model, sync=index == self.accumulation - 1), autocast_context(device, self.bf16):
                logits = self.model(**{name: value[start:start + micro] for name, value in inputs.items()})
                loss_sum, _ = summed_loss(logits, targets[start:start + micro], pad_id)
                (loss_sum * self.world / global_targets).backward()
            step_loss += loss_sum.detach().double()
        self.grad_norm = clip_gradients(self.model, self.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        tokens = self.global_batch * self.config.model.seq_len
        self.state["step"] += 1
        self.state["data_position"] += self.global_batch
        self.state["tokens_seen"] += tokens
        mean_loss = _all_reduce([float(step_loss)], device)[0] / global_targets
        self.window["loss"] += mean_loss
        self.window["tokens"] += tokens
        self.window["steps"] += 1
        if self.logger:
            self.logger.log({"step_loss": mean_loss}, step=self.state["step"])
        self._time_for_minutes_budget(time.perf_counter() - started)
        if self.config.fail_at_step == self.state["step"] and self.state["restarts"] == 0:
            raise RuntimeError(f"injected failure at step {self.state['step']} (loop config fail_at_step)")

    def evaluate(self, track: bool = True) -> dict[str, float]:
        """Val loss and bits-per-byte now; `track`: it counts for the best val loss and for patience
        (the untrained baseline does not)."""
        figures = evaluate(self.model, self.config.model, self.val_rows, self.val_mask, self.train.micro_batch_size,
                           self.config.pad_id, self.token_bytes, self.device, self.bf16)
        self.state.update(figures)
        if track:
            if figures["val_loss"] < self.state["best_val_loss"]:
                self.state["best_val_loss"], self.state["evals_without_improvement"] = figures["val_loss"], 0
            else:
                self.state["evals_without_improvement"] += 1
        return {"evaluated": 1, **figures}

    def maybe_checkpoint(self, metrics: dict[str, float], last_step: bool = False) -> None:
        """Report `metrics`, with a checkpoint on the `checkpoint_every` cadence and at the last step.
        MLflow gets val figures when they are measured; Ray (Tune) gets the latest every time."""
        if self.logger:
            self.logger.log(charted_figures(metrics, self._steady_news()), step=self.state["step"])
            self.logger.flush()
        metrics = {**metrics, "val_loss": self.state["val_loss"], "val_bpb": self.state["val_bpb"]}
        if not (last_step or self.due(self.train.checkpoint_every)):
            ray.train.report(metrics)
        else:
            self._save_and_report(metrics)
        self._open_window()

    def _steady_news(self) -> bool:
        """True once, at this worker group's first MLflow report, when it follows a restart."""
        news = not self.steady_charted and self.state["restarts"] > 0
        self.steady_charted = True
        return news

    # ------------------------------------------------------------------------------------------
    # Pieces

    def report_baseline(self) -> None:
        """The untrained model's val figures at step 0 (reported, not checkpointed, not tracked)."""
        figures = self.evaluate(track=False)
        self.state["val_loss_initial"] = self.state["val_loss"]
        metrics = {"step": 0, "loss": math.nan, "lr": 0.0, "tokens_seen": 0, "val_loss": figures["val_loss"],
                   "val_bpb": figures["val_bpb"], **self.base}
        if self.logger:
            self.logger.log(charted_figures(metrics, self._steady_news()), step=0)
            self.logger.flush()
        ray.train.report(metrics)

    def patience_exhausted(self) -> bool:
        patience = self.train.early_stopping_patience
        return bool(patience) and self.state["evals_without_improvement"] >= patience

    def window_metrics(self) -> dict[str, float]:
        """Figures of the steps since the last report (a resumed finished run has none: step and val only)."""
        window, state = self.window, self.state
        if not window["steps"]:
            return {"step": state["step"], "loss": math.nan, "lr": self.lr, "tokens_seen": state["tokens_seen"],
                    **self.base}
        elapsed = time.perf_counter() - window["started"]
        tokens_per_s = window["tokens"] / elapsed
        waited = {"checkpoint_wait_s": self.checkpoint_wait_s} if self.checkpoint_wait_s is not None else {}
        self.checkpoint_wait_s = None
        return {"step": state["step"], "loss": window["loss"] / window["steps"], "lr": self.lr,
                "grad_norm": self.grad_norm, "tokens_per_s": tokens_per_s, "step_time_s": elapsed / window["steps"],
                "mfu": mfu(self.flops, tokens_per_s / self.world, self.peak), "tokens_seen": state["tokens_seen"],
                "val_loss_initial": state.get("val_loss_initial", math.nan),
                **host_memory_metrics(), **device_memory_metrics(self.device), **waited, **self.base}

    def _open_window(self) -> None:
        self.window = {"loss": 0.0, "tokens": 0, "steps": 0, "started": time.perf_counter()}

    def _learning_rate(self) -> float:
        return learning_rate(self.state["step"], self.train.lr, self.train.warmup_steps, self.max_steps,
                             self.train.min_lr_ratio, self.train.schedule, self.train.decay_fraction)

    def _save_and_report(self, metrics: dict[str, float]) -> None:
        """Save this rank's shards to a local folder and hand it to Ray, which uploads it to the run's storage
        in a background thread and deletes the local copy once uploaded. The step waits for the local save
        only, however slow the storage (an object store); Ray registers the checkpoint after the upload and
        flushes pending uploads when the loop ends. The wait is reported in the next window's metrics."""
        step = self.state["step"]
        started = time.perf_counter()
        directory = tempfile.mkdtemp(prefix=f"raylm-step{step}-rank{self.rank}-")
        try:
            save_checkpoint(directory, self.model, self.optimizer, dict(self.state), self.config.model.to_dict(),
                            self.config.tokenizer_json, self.rank)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"checkpoint_{step:07d}_r{self.state['restarts']:03d}_{self.group}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        self.checkpoint_wait_s = time.perf_counter() - started


def finish_checkpoint_uploads() -> None:
    """Wait for this worker's background checkpoint uploads (ASYNC mode).

    Ray Train waits for them only when the loop returns; when it raises, an upload still in flight is
    dropped, and a restart goes back one checkpoint further than it needs to. Ray has no public call
    for this, hence its private thread pool; on a Ray without it this waits for nothing."""
    # deferred: a private Ray Train module; only the error path needs it
    from ray.train.v2._internal.execution.context import get_train_context

    pool = getattr(get_train_context(), "checkpoint_upload_threadpool", None)
    if pool is not None:
        pool.shutdown(wait=True)


def run_worker(config: LoopConfig) -> None:
    """One worker's whole run (`raylm.train.worker.train_loop_per_worker` calls it)."""
    try:
        Trainer(config).run()
    except Exception:
        finish_checkpoint_uploads()  # so the newest checkpoint saved before the error is the one resumed
        raise

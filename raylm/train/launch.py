"""The `pretrain` stage: a Ray Train `TorchTrainer` over the packed shards.

`build_trainer` makes the trainer (the pretrain stage, Ray Tune and fine-tuning all start from it);
`pretrain` runs it as a stage. The run's storage is the stage folder itself
(`RunConfig(storage_path=<stage>, name="train")`), so checkpoints live in the workspace, on shared
storage on a cluster, and rerunning the same stage resumes from the run's latest checkpoint instead
of starting over. Ray keeps the last `train.keep_checkpoints` checkpoints it registered, and a restart
first deletes the ones a killed run left unregistered and unused (`raylm.train.rotation`); `KeepBestCheckpoint`
(`raylm.train.best`) copies each new best one (by val loss) to `<run>/best`, so the best survives their rotation.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from typing import Any

import pyarrow.fs as pafs
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylm import tracking
from raylm.artifacts import Packed, Pretrained
from raylm.config import ConfigError, TrainConfig
from raylm.console import TrainingProgress
from raylm.model.config import WEIGHT_FREE_KEYS, TransformerConfig
from raylm.train.best import BEST_DIR, BEST_POINTER, KeepBestCheckpoint, best_checkpoint, read_best_pointer  # noqa: F401
from raylm.train.resources import WorkerResources, worker_resources
from raylm.train.budget import budget_steps
from raylm.train.rotation import rotate_unused_checkpoints
from raylm.train.loop_config import LoopConfig
from raylm.train.worker import train_loop_per_worker
from raylm.workspace import ATTEMPTS, StageDir, Workspace, read_text_uri

log = logging.getLogger("raylm")

RUN_NAME = "train"
ELASTIC_START_TIMEOUT_S = 15.0  # an elastic restart gives up on the old group size this soon (see TrainConfig)
STOP_FILE = "STOP"  # create it in the run folder to make the run checkpoint and finish at its next report


def run_model_config(model: TransformerConfig, train: TrainConfig, vocab_size: int) -> TransformerConfig:
    """The model a run trains: `model` bound to the tokenizer's `vocab_size` (see
    `TransformerConfig.for_tokenizer`), with `train.activation_checkpointing` switching on the model's."""
    bound = model.for_tokenizer(vocab_size)
    return replace(bound, activation_checkpointing=True) if train.activation_checkpointing else bound


RAY_TRAIN_ENV_KEYS = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")
_USER_RAY_TRAIN_ENV = {key: os.environ.get(key) for key in RAY_TRAIN_ENV_KEYS}  # as the user started us


def with_budget_steps(train: TrainConfig, model: TransformerConfig, global_batch_sequences: int) -> TrainConfig:
    """`train` with `max_steps` fixed by a FLOPs / tokens / tokens-per-parameter budget (a minutes budget
    is fixed by the loop, once it has measured its speed)."""
    if train.budget is None:
        return train
    steps = budget_steps(train.budget, model, global_batch_sequences)
    if steps is None:
        return train
    log.info("train.budget.%s = %g: %d steps of %d sequences x %d tokens", train.budget.kind, train.budget.amount,
             steps, global_batch_sequences, model.seq_len)
    return train.model_copy(update={"max_steps": steps})


def apply_ray_train_env(train: TrainConfig) -> None:
    """Put this run's settings in the environment Ray Train reads at fit(); a key this run leaves to Ray
    goes back to what the user set (or away), not to what an earlier run of this process set."""
    chosen = ray_train_env(train)
    for key in RAY_TRAIN_ENV_KEYS:
        value = chosen.get(key, _USER_RAY_TRAIN_ENV[key])
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def ray_train_env(train: TrainConfig) -> dict[str, str]:
    """Ray Train's failure-detection settings for this run (environment variables, Ray has no API for them)."""
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(train.health_check_interval_s)}
    elastic = train.min_workers < train.max_workers
    start_timeout = train.worker_group_start_timeout_s or (ELASTIC_START_TIMEOUT_S if elastic else None)
    if start_timeout is not None:
        env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(start_timeout)
    return env


def scaling_config(train: TrainConfig, resources: WorkerResources) -> ScalingConfig:
    workers = train.workers if isinstance(train.workers, int) else tuple(train.workers)
    extra = {}
    if not isinstance(workers, int):
        extra["elastic_resize_monitor_interval_s"] = train.elastic_resize_interval_s
    return ScalingConfig(num_workers=workers, use_gpu=resources.use_gpu,
                         resources_per_worker=resources.ray_resources(), **extra)


def build_trainer(model: TransformerConfig, train: TrainConfig, packed: Packed, storage_path: str, name: str,
                  tracking_uri: str, run_id: str | None, init_checkpoint: str | None = None,
                  finetune: dict[str, Any] | None = None, fail_at_step: int | None = None,
                  callbacks: list | None = None, resources: WorkerResources | None = None) -> TorchTrainer:
    """A `TorchTrainer` for the packed shards `packed` (the tokenize stage's artifact).

    The loop reports `loss, val_loss, val_bpb, lr, step, tokens_seen` (val figures at each eval);
    `init_checkpoint` loads model weights only (`--from`); a `finetune` spec makes every worker call
    `raylm.finetune.prepare_for_finetune`; `fail_at_step` injects one failure (tests, drills);
    `callbacks` go to `RunConfig(callbacks=...)`. Metrics go to MLflow run `run_id` from rank 0.
    `resources`: each worker's CPUs and torch threads (default: `raylm.train.resources.worker_resources`).

    When the run folder exists (a restart), the checkpoint folders an earlier killed run left unused are
    deleted first (`raylm.train.rotation`); their count goes to `run_id` as metric `checkpoints_rotated`.
    """
    val_uri = packed.require_val("raise data.val_fraction or add data")
    tokenizer_json = read_text_uri(packed.tokenizer.path)
    transformer = run_model_config(model, train, packed.tokenizer.vocab_size)
    if transformer.seq_len != packed.seq_len:
        raise ValueError(f"model.seq_len {transformer.seq_len} differs from the packed seq_len {packed.seq_len}")
    run_uri = storage_path.rstrip("/") + "/" + name
    resources = resources or worker_resources(train)
    log.info("%s: %s", name, resources.describe(train.workers))
    global_batch = train.global_batch_sequences(transformer.seq_len)
    train = with_budget_steps(train, transformer, global_batch)
    loop = LoopConfig(model=transformer, train=train,
                      global_batch_sequences=global_batch,
                      train_uri=packed.train_uri, val_uri=val_uri, tokenizer_json=tokenizer_json,
                      pad_id=packed.tokenizer.pad_id, tokenizer_fingerprint=packed.tokenizer.fingerprint,
                      tracking_uri=tracking_uri, run_id=run_id, init_checkpoint=init_checkpoint,
                      stop_uri=run_uri + "/" + STOP_FILE, finetune=finetune, fail_at_step=fail_at_step,
                      torch_threads=None if resources.chosen_by == "ray" else resources.torch_threads)
    rotated = rotate_unused_checkpoints(run_uri, train.keep_checkpoints)
    if rotated and run_id is not None:
        tracking.log_run_metric(tracking_uri, run_id, "checkpoints_rotated", len(rotated))
    apply_ray_train_env(train)  # read from the driver's environment at fit(), passed to the controller
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=scaling_config(train, resources),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            callbacks=[KeepBestCheckpoint(run_uri), *(callbacks or [])],
        ),
    )


def fit_with_progress(trainer: TorchTrainer, what: str, tracking_uri: str, run_id: str | None):
    """`trainer.fit()`, with a live progress line on the console (raylm/console.py) while it runs. The step
    count and batch are the ones build_trainer resolved (a budget's steps; a minutes budget's count comes from
    the run once measured)."""
    loop: LoopConfig = trainer.train_loop_config["loop"]
    budget = loop.train.budget
    max_steps = None if budget is not None and budget.kind == "minutes" else loop.train.max_steps
    with TrainingProgress(what, tracking_uri, run_id, max_steps, loop.global_batch_sequences * loop.model.seq_len):
        return trainer.fit()


def latest_run_stage(workspace: Workspace, planned: StageDir) -> StageDir:
    """The pretrain attempt whose run was written last (finished or not), reopened for more training.

    Its commit is removed so that the stage runs again in that attempt; Ray then resumes from its newest
    checkpoint.
    """
    selector = pafs.FileSelector(workspace.fs_path(planned.name), allow_not_found=True)
    runs = []
    for info in workspace.fs.get_file_info(selector):
        if info.type != pafs.FileType.Directory:
            continue
        stage = StageDir(workspace, planned.name, info.base_name, planned.config, planned.inputs)
        for attempt in [None, *(owner.attempt for owner in stage.owners())]:
            parts = [ATTEMPTS, attempt] if attempt else []
            snapshot = workspace.fs.get_file_info(stage.key_fs_path(*parts, RUN_NAME))
            if snapshot.type == pafs.FileType.Directory:
                runs.append((snapshot.mtime_ns or 0, info.base_name, attempt or ""))
    if not runs:
        raise FileNotFoundError(f"--resume: no pretrain run under {workspace.uri(planned.name)}")
    _, key, attempt = max(runs)
    stage = StageDir(workspace, planned.name, key, planned.config, planned.inputs, attempt=attempt or None)
    stage.uncommit()
    return stage


def plot_loss_curve(tracking_uri: str, run_id: str):
    """A matplotlib figure of the run's per-step train loss and its val loss (None if nothing logged)."""
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib.pyplot as plt

    curves = {metric: tracking.metric_history(tracking_uri, run_id, metric) for metric in ("step_loss", "val_loss")}
    if not curves["step_loss"]:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    for metric, label, style in (("step_loss", "train loss", "-"), ("val_loss", "val loss", "o-")):
        if curves[metric]:
            axis.plot(*zip(*curves[metric]), style, label=label, markersize=3)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (nats per token)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def check_init_checkpoint(model: TransformerConfig, source: str) -> None:
    """`pretrain --from`, on the driver before Ray starts: the checkpoint verifies, its metadata reads
    safely, and every weight it holds has the shape this config's model needs (else a ConfigError
    naming the model keys that differ)."""
    # deferred: pulls in torch, slow to import; only this path needs it
    import torch

    from raylm.model import build_model
    from raylm.train.checkpoint import CheckpointError, check_loadable, load_model_config, local_checkpoint

    try:
        with local_checkpoint(source) as directory:
            _, metadata = check_loadable(directory)
            theirs = load_model_config(directory)
    except (CheckpointError, OSError, ValueError) as error:
        raise ConfigError([f"--from {source}: {error}"]) from None
    mine = replace(model, vocab_size=theirs.vocab_size) if model.vocab_size is None else model
    with torch.device("meta"):
        needed = {f"model.{name}": tuple(t.shape) for name, t in build_model(mine).state_dict().items()}
    stored = {name: tuple(entry.size) for name, entry in metadata.state_dict_metadata.items() if hasattr(entry, "size")}
    misfits = sorted(name for name, shape in needed.items() if stored.get(name) != shape)
    if not misfits:
        return
    mine_dict, theirs_dict = mine.to_dict(), theirs.to_dict()
    problems = [f"model.{key} = {mine_dict.get(key)!r} but --from {source} has {key} = {value!r}"
                for key, value in sorted(theirs_dict.items())
                if key not in WEIGHT_FREE_KEYS and mine_dict.get(key) != value]
    more = f" and {len(misfits) - 1} more" if len(misfits) > 1 else ""
    raise ConfigError(problems + [f"--from {source}: its weights do not fit this model ({misfits[0]}: "
                                  f"{stored.get(misfits[0])} stored, {needed[misfits[0]]} needed{more})"])


def pretrain(model: TransformerConfig, train: TrainConfig, packed: Packed, stage: StageDir,
             tracking_uri: str, init_checkpoint: str | None = None) -> Pretrained:
    run_id = tracking.active_run_id()
    trainer = build_trainer(model, train, packed, stage.path(), RUN_NAME, tracking_uri, run_id, init_checkpoint)
    fs, stop = pafs.FileSystem.from_uri(stage.path(RUN_NAME, STOP_FILE) if "://" in stage.path() else
                                        "file://" + stage.path(RUN_NAME, STOP_FILE))
    if fs.get_file_info(stop).type == pafs.FileType.File:
        fs.delete_file(stop)  # a stop request of an earlier run does not stop this one
    result = fit_with_progress(trainer, "pretrain", tracking_uri, run_id)
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {stage.path(RUN_NAME)}")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if run_id is not None:
        figure = plot_loss_curve(tracking_uri, run_id)
        if figure is not None:
            tracking.log_figure(figure, "loss_curve.png")
    best = best_checkpoint(stage.path(RUN_NAME))
    tracking.set_tag("raylm.checkpoint", best or result.checkpoint.path)
    tracking.set_tag("raylm.last_checkpoint", result.checkpoint.path)
    log.info("pretrain: finished at step %s, val_loss %.4f, best checkpoint %s, last %s", metrics.get("step"),
             metrics.get("val_loss", float("nan")), best, result.checkpoint.path)
    return Pretrained(checkpoint=best or result.checkpoint.path, last_checkpoint=result.checkpoint.path,
                      run_path=stage.path(RUN_NAME), model=run_model_config(model, train, packed.tokenizer.vocab_size).to_dict(),
                      tokenizer=packed.tokenizer, metrics=metrics)

"""The `pretrain` stage: a Ray Train `TorchTrainer` over the packed shards.

`build_trainer` makes the trainer (the pretrain stage, Ray Tune and fine-tuning all start from it);
`pretrain` runs it as a stage. The run's storage is the stage folder itself
(`RunConfig(storage_path=<stage>, name="train")`), so checkpoints live in the workspace, on shared
storage on a cluster, and rerunning the same stage resumes from the run's latest checkpoint instead
of starting over. Ray keeps the last `train.keep_checkpoints` checkpoints; `KeepBestCheckpoint`
copies each new best one (by val loss) to `<run>/best`, so the best survives their rotation.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import replace
from typing import Any

import mlflow
import pyarrow.fs as pafs
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylm.artifacts import Packed, Pretrained
from raylm.config import TrainConfig
from raylm.model import TransformerConfig
from raylm.runtime import cluster_has_gpus
from raylm.train.loop import LoopConfig, train_loop_per_worker
from raylm.workspace import SUCCESS_MARKER, StageDir, Workspace, read_text_uri

log = logging.getLogger("raylm")

RUN_NAME = "train"
BEST_DIR = "best"
STOP_FILE = "STOP"  # create it in the run folder to make the run checkpoint and finish at its next report


def run_model_config(model: TransformerConfig, train: TrainConfig, vocab_size: int) -> TransformerConfig:
    """The model a run trains: `model` bound to the tokenizer's `vocab_size` (see
    `TransformerConfig.for_tokenizer`), with `train.activation_checkpointing` switching on the model's."""
    bound = model.for_tokenizer(vocab_size)
    return replace(bound, activation_checkpointing=True) if train.activation_checkpointing else bound


def scaling_config(train: TrainConfig) -> ScalingConfig:
    use_gpu = cluster_has_gpus() if train.use_gpu == "auto" else train.use_gpu
    workers = train.workers if isinstance(train.workers, int) else tuple(train.workers)
    extra = {}
    if not isinstance(workers, int):
        extra["elastic_resize_monitor_interval_s"] = train.elastic_resize_interval_s
    if train.cpus_per_worker is not None:
        extra["resources_per_worker"] = {"CPU": train.cpus_per_worker}  # Ray adds GPU: 1 when use_gpu
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu, **extra)


class KeepBestCheckpoint(ray.train.UserCallback):
    """On the controller: copy a reported checkpoint to `<run>/best` when its val loss is the best yet.

    Stateless across restarts: the best so far is read back from `<run>/best/best.json`.
    """

    def __init__(self, run_uri: str):
        self.fs, self.base = pafs.FileSystem.from_uri(run_uri.rstrip("/") + "/" + BEST_DIR)
        self.best: float | None = None

    def _best_so_far(self) -> float:
        if self.best is None:
            self.best = math.inf
            info = self.fs.get_file_info(self.base + "/best.json")
            if info.type == pafs.FileType.File:
                with self.fs.open_input_stream(info.path) as stream:
                    self.best = float(json.loads(stream.read())["val_loss"])
        return self.best

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None or not metrics or not metrics[0].get("evaluated") or "val_loss" not in metrics[0]:
            return  # only checkpoints whose val loss was measured at that step
        val_loss = float(metrics[0]["val_loss"])
        if not val_loss < self._best_so_far():
            return
        staging = self.base + ".tmp"
        if self.fs.get_file_info(staging).type == pafs.FileType.Directory:
            self.fs.delete_dir(staging)
        self.fs.create_dir(staging, recursive=True)
        pafs.copy_files(checkpoint.path, staging, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=self.fs)
        if self.fs.get_file_info(self.base).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.base)
        self.fs.move(staging, self.base)
        with self.fs.open_output_stream(self.base + "/best.json") as out:
            out.write(json.dumps({"val_loss": val_loss, "step": metrics[0].get("step"),
                                  "source": checkpoint.path}).encode())
        self.best = val_loss


def build_trainer(model: TransformerConfig, train: TrainConfig, packed: Packed, storage_path: str, name: str,
                  tracking_uri: str, run_id: str | None, init_checkpoint: str | None = None,
                  finetune: dict[str, Any] | None = None, fail_at_step: int | None = None,
                  callbacks: list | None = None) -> TorchTrainer:
    """A `TorchTrainer` for the packed shards `packed` (the tokenize stage's artifact).

    The loop reports `loss, val_loss, val_bpb, lr, step, tokens_seen` (val figures at each eval);
    `init_checkpoint` loads model weights only (`--from`); a `finetune` spec makes every worker call
    `raylm.finetune.prepare_for_finetune`; `fail_at_step` injects one failure (tests, drills);
    `callbacks` go to `RunConfig(callbacks=...)`. Metrics go to MLflow run `run_id` from rank 0.
    """
    val_uri = packed.require_val("raise data.val_fraction or add data")
    tokenizer_json = read_text_uri(packed.tokenizer.path)
    transformer = run_model_config(model, train, packed.tokenizer.vocab_size)
    if transformer.seq_len != packed.seq_len:
        raise ValueError(f"model.seq_len {transformer.seq_len} differs from the packed seq_len {packed.seq_len}")
    run_uri = storage_path.rstrip("/") + "/" + name
    loop = LoopConfig(model=transformer, train=train,
                      global_batch_sequences=train.global_batch_sequences(transformer.seq_len),
                      train_uri=packed.train_uri, val_uri=val_uri, tokenizer_json=tokenizer_json,
                      pad_id=packed.tokenizer.pad_id, tokenizer_fingerprint=packed.tokenizer.fingerprint,
                      tracking_uri=tracking_uri, run_id=run_id, init_checkpoint=init_checkpoint,
                      stop_uri=run_uri + "/" + STOP_FILE, finetune=finetune, fail_at_step=fail_at_step)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"loop": loop},
        scaling_config=scaling_config(train),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
            callbacks=[KeepBestCheckpoint(run_uri), *(callbacks or [])],
        ),
    )


def best_checkpoint(run_uri: str) -> str | None:
    fs, base = pafs.FileSystem.from_uri(run_uri.rstrip("/") + "/" + BEST_DIR + "/best.json")
    return run_uri.rstrip("/") + "/" + BEST_DIR if fs.get_file_info(base).type == pafs.FileType.File else None


def latest_run_stage(workspace: Workspace, planned: StageDir) -> StageDir:
    """The pretrain folder whose run was written last (finished or not), reopened for more training.

    Its success marker is removed so that the stage runs; Ray then resumes from its newest checkpoint.
    """
    selector = pafs.FileSelector(workspace.fs_path(planned.name), allow_not_found=True)
    runs = []
    for info in workspace.fs.get_file_info(selector):
        snapshot = workspace.fs.get_file_info(workspace.fs_path(planned.name, info.base_name, RUN_NAME))
        if info.type == pafs.FileType.Directory and snapshot.type == pafs.FileType.Directory:
            runs.append((snapshot.mtime_ns or 0, info.base_name))
    if not runs:
        raise FileNotFoundError(f"--resume: no pretrain run under {workspace.uri(planned.name)}")
    key = max(runs)[1]
    stage = StageDir(workspace, planned.name, key, planned.config, planned.inputs)
    marker = stage.fs_path(SUCCESS_MARKER)
    if workspace.fs.get_file_info(marker).type == pafs.FileType.File:
        workspace.fs.delete_file(marker)
    return stage


def plot_loss_curve(tracking_uri: str, run_id: str):
    """A matplotlib figure of the run's per-step train loss and its val loss (None if nothing logged)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    curves = {}
    for metric in ("step_loss", "val_loss"):
        latest = {}
        for point in sorted(client.get_metric_history(run_id, metric), key=lambda m: m.timestamp):
            latest[point.step] = point.value  # a step redone after a restart keeps its last value
        curves[metric] = sorted(latest.items())
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


def pretrain(model: TransformerConfig, train: TrainConfig, packed: Packed, stage: StageDir,
             tracking_uri: str, init_checkpoint: str | None = None) -> Pretrained:
    run = mlflow.active_run()
    trainer = build_trainer(model, train, packed, stage.path(), RUN_NAME, tracking_uri,
                            run.info.run_id if run else None, init_checkpoint)
    fs, stop = pafs.FileSystem.from_uri(stage.path(RUN_NAME, STOP_FILE) if "://" in stage.path() else
                                        "file://" + stage.path(RUN_NAME, STOP_FILE))
    if fs.get_file_info(stop).type == pafs.FileType.File:
        fs.delete_file(stop)  # a stop request of an earlier run does not stop this one
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {stage.path(RUN_NAME)}")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if run is not None:
        figure = plot_loss_curve(tracking_uri, run.info.run_id)
        if figure is not None:
            mlflow.log_figure(figure, "loss_curve.png")
    best = best_checkpoint(stage.path(RUN_NAME))
    mlflow.set_tag("raylm.checkpoint", best or result.checkpoint.path)
    mlflow.set_tag("raylm.last_checkpoint", result.checkpoint.path)
    log.info("pretrain: finished at step %s, val_loss %.4f, best checkpoint %s, last %s", metrics.get("step"),
             metrics.get("val_loss", float("nan")), best, result.checkpoint.path)
    return Pretrained(checkpoint=best or result.checkpoint.path, last_checkpoint=result.checkpoint.path,
                      run_path=stage.path(RUN_NAME), model=run_model_config(model, train, packed.tokenizer.vocab_size).to_dict(),
                      tokenizer=packed.tokenizer, metrics=metrics)

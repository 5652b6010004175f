"""The `pretrain` stage: a Ray Train `TorchTrainer` over the packed shards.

The run's storage is the stage folder itself (`RunConfig(storage_path=<stage>, name="train")`), so
checkpoints live in the workspace, on shared storage on a cluster, and rerunning the same stage
resumes from the run's latest checkpoint instead of starting over.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raylm.config import ModelConfig, TrainConfig
from raylm.model import TransformerConfig
from raylm.runtime import cluster_has_gpus
from raylm.train.loop import train_loop_per_worker
from raylm.workspace import StageDir, read_text_uri

log = logging.getLogger("raylm")

RUN_NAME = "train"


def model_config_for(model: ModelConfig, vocab_size: int) -> TransformerConfig:
    return TransformerConfig.from_dict({**model.model_dump(mode="json"), "vocab_size": vocab_size})


def scaling_config(train: TrainConfig) -> ScalingConfig:
    use_gpu = cluster_has_gpus() if train.use_gpu == "auto" else train.use_gpu
    workers = train.workers if isinstance(train.workers, int) else tuple(train.workers)
    return ScalingConfig(num_workers=workers, use_gpu=use_gpu)


def pretrain(model: ModelConfig, train: TrainConfig, packed: dict[str, Any], stage: StageDir,
             tracking_uri: str, init_checkpoint: str | None = None) -> dict[str, Any]:
    if "val" not in packed["outputs"]:
        raise ValueError("the packed val split is empty: raise data.val_fraction or add data")
    tokenizer_json = read_text_uri(packed["tokenizer"]["path"])
    transformer = model_config_for(model, packed["tokenizer"]["vocab_size"])
    if transformer.seq_len != packed["seq_len"]:
        raise ValueError(f"model.seq_len {transformer.seq_len} differs from the packed seq_len {packed['seq_len']}")
    run = mlflow.active_run()
    loop_config = {
        "model": transformer.to_dict(),
        "train": train.model_dump(mode="json"),
        "train_uri": packed["outputs"]["train"],
        "val_uri": packed["outputs"]["val"],
        "tokenizer_json": tokenizer_json,
        "pad_id": packed["tokenizer"]["pad_id"],
        "tracking_uri": tracking_uri,
        "run_id": run.info.run_id if run else None,
        "init_checkpoint": init_checkpoint,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(train),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=stage.path(),
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint under {stage.path(RUN_NAME)}")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    mlflow.set_tag("raylm.checkpoint", result.checkpoint.path)
    log.info("pretrain: finished at step %s, val_loss %.4f, checkpoint %s",
             metrics.get("step"), metrics.get("val_loss", float("nan")), result.checkpoint.path)
    return {
        "metrics": metrics,
        "checkpoint": result.checkpoint.path,
        "run_path": stage.path(RUN_NAME),
        "model": transformer.to_dict(),
        "tokenizer": packed["tokenizer"],
    }


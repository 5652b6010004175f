"""`LoopConfig`: everything the driver hands each training worker, validated on the driver and pickled.

A module of its own, importing only configs, so that the driver, Ray Train's controller and the worker's
entry point (`raylm.train.worker`) share it without importing the loop and what the loop needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raylm.config import TrainConfig
from raylm.model.config import TransformerConfig


@dataclass(frozen=True)
class LoopConfig:
    """Everything a training worker needs, validated on the driver and pickled to the workers."""

    model: TransformerConfig  # bound to the tokenizer's vocabulary
    train: TrainConfig
    global_batch_sequences: int
    train_uri: str
    val_uri: str
    tokenizer_json: str
    pad_id: int
    tokenizer_fingerprint: str | None = None
    tracking_uri: str = ""
    run_id: str | None = None  # MLflow run that rank 0 logs per-step figures to
    init_checkpoint: str | None = None  # `--from`: model weights only
    stop_uri: str | None = None  # the run's STOP file
    finetune: dict[str, Any] | None = None  # prepare_for_finetune's spec
    fail_at_step: int | None = None  # fault injection (tests, drills): fail once, before any restart
    torch_threads: int | None = None  # intra-op threads, following the CPUs each worker holds (train.resources)

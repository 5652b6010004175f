"""What the driver hands each training worker: the loop's config and the entry point Ray Train calls.

Kept apart from `raylm.train.loop` so that the processes that only pass them on (the driver that builds
the `TorchTrainer`) need not import what the loop needs (torch.distributed.checkpoint, FSDP, MLflow's
client, the tokenizer): the worker imports the loop when it starts.
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


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """Ray Train's entry point: its `train_loop_config` is a dict, holding the typed config under `loop`."""
    # deferred: pulls in torch, DCP, MLflow, slow to import; only the worker needs them
    from raylm.train.loop import run_worker

    run_worker(config["loop"])

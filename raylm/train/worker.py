"""The entry point Ray Train calls on each training worker.

Kept apart from `raylm.train.loop` so that the processes that only pass it on (the driver that builds
the `TorchTrainer`, Ray Train's controller) need not import what the loop needs (torch.distributed.checkpoint, FSDP, MLflow's
client, the tokenizer): the worker imports the loop when it starts.
"""

from __future__ import annotations

from raylm.train.loop_config import LoopConfig


def train_loop_per_worker(config: dict[str, LoopConfig]) -> None:
    """Ray Train's entry point: its `train_loop_config` is a dict, holding the typed config under `loop`."""
    # deferred: pulls in torch, DCP, MLflow, slow to import; only the worker needs them
    from raylm.train.loop import run_worker

    run_worker(config["loop"])

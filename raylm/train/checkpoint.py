"""Checkpoints as directories: sharded model and optimizer state, plus the trainer state as JSON.

Model and optimizer state go through `torch.distributed.checkpoint` (DCP): every worker writes its
own shard and rank 0 the metadata, so a checkpoint saved by N workers loads on M, and loading never
unpickles arbitrary objects. Beside the shards: `trainer_state.json` (step, tokens seen, data
position, best val loss), `model_config.json`, `tokenizer.json`, and each rank's RNG state.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from raylm.model import TransformerConfig, build_model

TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
DCP_METADATA = ".metadata"


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete or unreadable."""


@contextlib.contextmanager
def local_checkpoint(path: str) -> Iterator[str]:
    """A local directory for a checkpoint path or URI (downloaded for s3:// and gs://)."""
    if "://" not in path or path.startswith("file://"):
        yield path.removeprefix("file://")
        return
    from ray.train import Checkpoint

    with Checkpoint(path).as_directory() as directory:
        yield directory


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=True)


def rng_state() -> dict[str, str]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def restore_rng_state(state: dict[str, str]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8))


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    model_config: dict[str, Any], tokenizer_json: str | None, rank: int) -> None:
    """Collective: every rank calls it with its own (temporary) directory."""
    os.makedirs(directory, exist_ok=True)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    _write_json(os.path.join(directory, f"rng_rank{rank}.json"), rng_state())
    if rank == 0:
        _write_json(os.path.join(directory, MODEL_CONFIG), model_config)
        if tokenizer_json is not None:
            with open(os.path.join(directory, TOKENIZER), "w") as handle:
                handle.write(tokenizer_json)
        _write_json(os.path.join(directory, TRAINER_STATE), trainer_state)  # last: marks the rank-0 part done


def check_complete(directory: str) -> None:
    missing = [name for name in (DCP_METADATA, TRAINER_STATE, MODEL_CONFIG) if not os.path.exists(os.path.join(directory, name))]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")


def read_trainer_state(directory: str) -> dict[str, Any]:
    check_complete(directory)
    with open(os.path.join(directory, TRAINER_STATE)) as handle:
        return json.load(handle)


def load_training_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        rank: int) -> dict[str, Any]:
    """Collective: load shards into the (possibly differently sharded) model and optimizer."""
    trainer_state = read_trainer_state(directory)
    model_state, optim_state = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], None)
    state = {"model": model_state} if optim_state is None else {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=directory)
    except Exception as error:  # noqa: BLE001 - DCP raises many kinds; all mean "unreadable"
        raise CheckpointError(f"checkpoint {directory} cannot be read: {error}") from error
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    rng_file = os.path.join(directory, f"rng_rank{rank}.json")
    if os.path.exists(rng_file):
        with open(rng_file) as handle:
            restore_rng_state(json.load(handle))
    return trainer_state


def load_model_config(directory: str) -> TransformerConfig:
    with open(os.path.join(directory, MODEL_CONFIG)) as handle:
        return TransformerConfig.from_dict(json.load(handle))


def load_tokenizer_json(directory: str) -> str | None:
    path = os.path.join(directory, TOKENIZER)
    if not os.path.exists(path):
        return None
    with open(path) as handle:
        return handle.read()


def load_model(directory: str, device: str | torch.device = "cpu") -> nn.Module:
    """A plain (unsharded) model from a checkpoint, in eval mode, with no process group needed."""
    check_complete(directory)
    model = build_model(load_model_config(directory))
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=directory)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {directory} cannot be read: {error}") from error
    model.load_state_dict(state["model"])
    return model.to(device).eval()

"""Checkpoints as directories: sharded model and optimizer state, plus the trainer state as JSON.

Model and optimizer state go through `torch.distributed.checkpoint` (DCP): every worker writes its
own shard and rank 0 the metadata, so a checkpoint saved by N workers loads on M. Loading goes through
`safe_dcp.load_state`, which reads DCP's pickles with restricted unpicklers: a crafted checkpoint is
refused, naming the file, and runs no code. Beside the shards: `trainer_state.json` (step, tokens seen,
data position, best val loss, world size), `model_config.json`, `tokenizer.json`, each rank's RNG state.

Every rank lists the files it wrote with their sizes and SHA-256 (`files_rank<r>.json`, written last);
rank 0's list covers the metadata, the trainer state, the model config and the tokenizer. `verify_checkpoint`
checks all of that before anything is loaded, so a truncated or corrupted checkpoint is refused whole,
never half-read; `good_checkpoints` walks back from the newest checkpoint of a run through the ones that pass.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from raylm.model import TransformerConfig, build_model

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

TRAINER_STATE = "trainer_state.json"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
DCP_METADATA = ".metadata"
FILES = "files_rank{rank}.json"
CHECKPOINT_NAME = re.compile(r"checkpoint_(\d{7,})_r(\d{3,})(?:_[0-9a-f]+)?")  # as `loop.Trainer` names its folders

log = logging.getLogger("raylm")


class CheckpointError(RuntimeError):
    """A checkpoint directory that is incomplete or unreadable."""


@contextlib.contextmanager
def local_checkpoint(path: str) -> Iterator[str]:
    """A local directory for a checkpoint path or URI (downloaded for s3:// and gs://)."""
    if "://" not in path or path.startswith("file://"):
        yield path.removeprefix("file://")
        return
    # deferred: pulls in ray, slow to import; only this path needs it
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


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_file_list(directory: str, rank: int) -> None:
    names = sorted(n for n in os.listdir(directory) if not n.startswith("files_rank"))
    listing = {n: {"bytes": os.path.getsize(os.path.join(directory, n)), "sha256": _sha256(os.path.join(directory, n))}
               for n in names if os.path.isfile(os.path.join(directory, n))}
    _write_json(os.path.join(directory, FILES.format(rank=rank)), listing)


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
                    model_config: dict[str, Any], tokenizer_json: str | None, rank: int) -> None:
    """Collective: every rank calls it with its own (temporary) directory; Ray merges the folders."""
    os.makedirs(directory, exist_ok=True)
    # deferred: pulls in torch.distributed.checkpoint, slow to import (the driver imports this module for
    # its listings only); only this path needs it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=directory)
    _write_json(os.path.join(directory, f"rng_rank{rank}.json"), rng_state())
    if rank == 0:
        _write_json(os.path.join(directory, MODEL_CONFIG), model_config)
        if tokenizer_json is not None:
            with open(os.path.join(directory, TOKENIZER), "w") as handle:
                handle.write(tokenizer_json)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        _write_json(os.path.join(directory, TRAINER_STATE), {**trainer_state, "world_size": world})
    _write_file_list(directory, rank)  # last: its presence says this rank's part is complete


REQUIRED_BY_RANK0 = (DCP_METADATA, TRAINER_STATE, MODEL_CONFIG)


def check_complete(directory: str) -> None:
    required = (*REQUIRED_BY_RANK0, FILES.format(rank=0))
    missing = [name for name in required if not os.path.exists(os.path.join(directory, name))]
    if missing:
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {', '.join(missing)}")


def _read_json(directory: str, name: str) -> Any:
    try:
        with open(os.path.join(directory, name)) as handle:
            return json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"checkpoint {directory}: {name} is not valid JSON ({error})") from None


def read_trainer_state(directory: str) -> dict[str, Any]:
    check_complete(directory)
    state = _read_json(directory, TRAINER_STATE)
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {directory}: {TRAINER_STATE} is not a JSON object")
    return state


def _check_listed_files(directory: str, rank: int, required: tuple[str, ...]) -> None:
    name = FILES.format(rank=rank)
    if not os.path.exists(os.path.join(directory, name)):
        raise CheckpointError(f"checkpoint {directory} is incomplete: missing {name}")
    listing = _read_json(directory, name)
    if not isinstance(listing, dict) or not listing:
        raise CheckpointError(f"checkpoint {directory}: {name} lists no files")
    unlisted = [n for n in required if n not in listing]
    if unlisted:
        raise CheckpointError(f"checkpoint {directory}: {name} does not cover {', '.join(unlisted)} "
                              f"(written by an older raylm, or edited)")
    for listed, expected in listing.items():
        path = os.path.join(directory, listed)
        if os.path.basename(listed) != listed or not isinstance(expected, dict):
            raise CheckpointError(f"checkpoint {directory}: {name} has a bad entry {listed!r}")
        if not os.path.exists(path):
            raise CheckpointError(f"checkpoint {directory} is incomplete: missing {listed}")
        size = os.path.getsize(path)
        if size != expected.get("bytes"):
            raise CheckpointError(f"checkpoint {directory} is corrupted: {listed} has {size} bytes, "
                                  f"expected {expected.get('bytes')} (truncated?)")
        if _sha256(path) != expected.get("sha256"):
            raise CheckpointError(f"checkpoint {directory} is corrupted: {listed} fails its SHA-256 check")


def verify_checkpoint(directory: str) -> dict[str, Any]:
    """The trainer state, once every rank's file list checks out (sizes and SHA-256); else CheckpointError.

    Rank 0's list must cover the metadata, the trainer state and the model config (and the tokenizer
    when there is one), so the world size that says how many lists to check is itself checked first."""
    check_complete(directory)
    rank0 = REQUIRED_BY_RANK0 + ((TOKENIZER,) if os.path.exists(os.path.join(directory, TOKENIZER)) else ())
    _check_listed_files(directory, 0, (*rank0, "rng_rank0.json"))
    state = read_trainer_state(directory)
    world = state.get("world_size", 1)
    if not isinstance(world, int) or isinstance(world, bool) or world < 1:
        raise CheckpointError(f"checkpoint {directory}: {TRAINER_STATE} has world_size {world!r}, expected an integer >= 1")
    for rank in range(1, world):
        _check_listed_files(directory, rank, (f"rng_rank{rank}.json",))
    return state


def check_loadable(directory: str) -> tuple[dict[str, Any], Metadata]:
    """What a driver checks before it hands a checkpoint to workers: it verifies, and its DCP metadata reads
    safely (returned). CheckpointError otherwise."""
    # deferred: pulls in torch.distributed.checkpoint, slow to import; only this path needs it
    from raylm.train.safe_dcp import UnsafeCheckpointError, check_metadata

    state = verify_checkpoint(directory)
    try:
        return state, check_metadata(directory)
    except UnsafeCheckpointError as error:
        raise CheckpointError(str(error)) from None


def newest_first(names: Iterable[str]) -> list[str]:
    """Checkpoint folder names (`CHECKPOINT_NAME`), newest first: by step, then restart count, then name."""
    def order(name: str) -> tuple[int, int, str]:
        step, restarts = CHECKPOINT_NAME.fullmatch(name).groups()
        return int(step), int(restarts), name
    return sorted(names, key=order, reverse=True)


def checkpoint_folders(filesystem, run_folder: str) -> list[str]:
    """Names of the run's checkpoint folders (`CHECKPOINT_NAME`) on a pyarrow `filesystem`, newest first;
    other folders are not ours."""
    import pyarrow.fs as pafs  # deferred, as in good_checkpoints

    children = filesystem.get_file_info(pafs.FileSelector(run_folder, allow_not_found=True))
    return newest_first(info.base_name for info in children
                        if info.type == pafs.FileType.Directory and CHECKPOINT_NAME.fullmatch(info.base_name))


def good_checkpoints(run_folder: str, filesystem=None, refusals: list[str] | None = None) -> Iterator[str]:
    """The run's checkpoints that verify, newest first (by step, then restart, from the folder names),
    whether or not Ray registered them: a run killed after a checkpoint's upload but before Ray recorded
    it resumes from that checkpoint. Lazy: a caller that loads the first one reads no other. Each
    skipped checkpoint's error goes to `refusals`."""
    # deferred: pulls in pyarrow, ray, slow to import; only this path needs it
    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    if filesystem is None:
        filesystem, run_folder = pafs.FileSystem.from_uri(run_folder) if "://" in run_folder else (pafs.LocalFileSystem(), run_folder)
    refusals = [] if refusals is None else refusals
    run_folder = run_folder.rstrip("/")
    for name in checkpoint_folders(filesystem, run_folder):
        path = f"{run_folder}/{name}"
        try:
            with Checkpoint(path, filesystem).as_directory() as directory:
                verify_checkpoint(directory)
        except CheckpointError as error:
            log.warning("refusing checkpoint: %s", error)
            refusals.append(str(error))
            continue
        yield path


def newest_good_checkpoint(latest_path: str, filesystem=None) -> tuple[str, list[str]]:
    """The newest checkpoint that verifies among `latest_path` and its siblings in the run folder.

    Returns (path, refusals): each refusal is the error of a newer checkpoint that was skipped.
    Raises CheckpointError when none verifies.
    """
    refusals: list[str] = []
    parent = latest_path.rstrip("/").rsplit("/", 1)[0]
    for path in good_checkpoints(parent, filesystem, refusals):
        return path, refusals
    raise CheckpointError(f"no usable checkpoint in {parent}: " + "; ".join(refusals))


def _load(state: dict[str, Any], directory: str) -> None:
    # deferred: pulls in torch.distributed.checkpoint, slow to import; only this path needs it
    from raylm.train.safe_dcp import load_state

    try:
        load_state(state, directory)
    except Exception as error:  # noqa: BLE001 - DCP and the safe readers raise many kinds; all mean "unreadable"
        raise CheckpointError(f"checkpoint {directory} cannot be read: {error}") from None


def load_training_state(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                        rank: int) -> dict[str, Any]:
    """Collective: load shards into the (possibly differently sharded) model and optimizer.

    With `optimizer=None` only the model weights are loaded (`--from`)."""
    # deferred: pulls in torch.distributed.checkpoint, slow to import; only this path needs it
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    trainer_state = verify_checkpoint(directory)
    model_state, optim_state = get_state_dict(model, optimizer) if optimizer is not None else (get_state_dict(model, [])[0], None)
    state = {"model": model_state} if optim_state is None else {"model": model_state, "optim": optim_state}
    _load(state, directory)
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
    verify_checkpoint(directory)
    model = build_model(load_model_config(directory))
    state = {"model": model.state_dict()}
    _load(state, directory)
    model.load_state_dict(state["model"])
    return model.to(device).eval()

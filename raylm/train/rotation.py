"""Rotation of the checkpoint folders a killed run left unused, before the run starts again in its folder.

Ray Train keeps a run's last `train.keep_checkpoints` checkpoints, but only those it registered: the ones
named in `<run>/checkpoint_manager_snapshot.json`, which it rewrites after each checkpoint's upload and
before it deletes the checkpoints that fell out of the window. A run killed mid-flight (SIGKILL, a lost
node) leaves `checkpoint_*` folders that no snapshot names: complete ones uploaded after the last
snapshot, partial ones whose upload was cut off (a rank's files missing), and evicted ones Ray had not
deleted yet. Ray never looks at them again, so every kill would leak them. Before the trainer starts,
`rotate_unused_checkpoints`:

- keeps every folder the snapshot names: Ray refuses to restore a run whose registered checkpoint is gone
  (`CheckpointManagerInitializationError`, "corrupted run directory");
- keeps an unregistered folder that looks complete while it is among the run's newest `keep` complete
  checkpoints, registered or not: resuming takes the newest checkpoint that verifies, registered or not
  (`checkpoint.good_checkpoints`), so the newest good state is never lost;
- deletes every other unregistered `checkpoint_*` folder: the partial ones and the older complete ones.

"Looks complete" is judged from file listings and the small JSON files (trainer state, each rank's file
list: every listed file present at its listed size), so nothing large is read from an object store; the
SHA-256 check stays with `verify_checkpoint` at resume. Only direct children of the run folder named like
a checkpoint (`checkpoint_<step>_r<restarts>[_<group>]`) are ever deleted; a snapshot that cannot be read
deletes nothing.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pyarrow.fs as pafs

from raylm.storage import filesystem_for
from raylm.train.checkpoint import FILES, REQUIRED_BY_RANK0, TRAINER_STATE, checkpoint_folders, newest_first

log = logging.getLogger("raylm")

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it registered
MAX_JSON_BYTES = 16 << 20  # a trainer state or file list larger than this is not one raylm wrote


def unused_checkpoints(complete: dict[str, bool], registered: set[str], keep: int) -> list[str]:
    """Which checkpoint folders to delete, newest first, given whether each looks complete.

    Registered folders stay; an unregistered one stays when it is complete and among the newest `keep`
    complete folders (registered ones count); the others go."""
    newest_complete = [name for name in newest_first(complete) if complete[name]][:keep]
    return [name for name in newest_first(complete) if name not in registered and name not in newest_complete]


def strings_in(tree: Any) -> set[str]:
    """Every string value anywhere in a JSON document."""
    if isinstance(tree, str):
        return {tree}
    if isinstance(tree, dict):
        return set().union(*(strings_in(value) for value in tree.values()))
    if isinstance(tree, list):
        return set().union(*(strings_in(value) for value in tree))
    return set()


def read_json(filesystem: pafs.FileSystem, path: str) -> Any:
    """A small JSON file; ValueError when it is not JSON or too large to be one raylm wrote."""
    with filesystem.open_input_stream(path, compression=None) as stream:
        data = stream.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{path} is over {MAX_JSON_BYTES} bytes")
    return json.loads(data)


def registered_checkpoints(filesystem: pafs.FileSystem, run_folder: str) -> set[str] | None:
    """The names Ray's snapshot mentions (its checkpoint folders among them); an empty set when there is no
    snapshot; None when it cannot be read, so that nothing is deleted."""
    path = f"{run_folder}/{SNAPSHOT}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return set()
    try:
        return strings_in(read_json(filesystem, path))
    except (OSError, ValueError) as error:
        log.warning("checkpoint rotation skipped: %s cannot be read (%s)", path, error)
        return None


def incompleteness(filesystem: pafs.FileSystem, folder: str) -> str | None:
    """Why the checkpoint in `folder` is partial (a missing or short file), or None when it looks complete."""
    files = {info.base_name: info.size for info in filesystem.get_file_info(pafs.FileSelector(folder))
             if info.type == pafs.FileType.File}
    missing = [name for name in (*REQUIRED_BY_RANK0, FILES.format(rank=0)) if name not in files]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        state = read_json(filesystem, f"{folder}/{TRAINER_STATE}")
        world = state.get("world_size", 1) if isinstance(state, dict) else None
        if not isinstance(world, int) or isinstance(world, bool) or world < 1:
            return f"{TRAINER_STATE} has world_size {world!r}"
        for rank in range(world):
            name = FILES.format(rank=rank)
            if name not in files:
                return f"missing {name}"
            listing = read_json(filesystem, f"{folder}/{name}")
            if not isinstance(listing, dict) or not listing:
                return f"{name} lists no files"
            for listed, expected in listing.items():
                if listed not in files:
                    return f"missing {listed}"
                if not isinstance(expected, dict) or files[listed] != expected.get("bytes"):
                    return f"{listed} has {files[listed]} bytes, {name} expects {expected}"
    except (OSError, ValueError) as error:
        return str(error)
    return None


def rotate_unused_checkpoints(run_uri: str, keep: int) -> list[str]:
    """Delete the checkpoint folders of run `run_uri` that Ray never registered and resuming does not need
    (see the module docstring); the deleted folder names, newest first. A run folder that does not exist
    yet (a new run) has none."""
    filesystem, run_folder = filesystem_for(run_uri)
    run_folder = run_folder.rstrip("/")
    names = checkpoint_folders(filesystem, run_folder)
    if not names:
        return []
    registered = registered_checkpoints(filesystem, run_folder)
    if registered is None:
        return []
    complete = {}
    for name in names:
        if name in registered:
            complete[name] = True  # Ray registers a checkpoint once every rank's upload is done
            continue
        reason = incompleteness(filesystem, f"{run_folder}/{name}")
        if reason is not None:
            log.info("checkpoint %s/%s is partial: %s", run_uri.rstrip("/"), name, reason)
        complete[name] = reason is None
    unused = unused_checkpoints(complete, registered, keep)
    for name in unused:
        filesystem.delete_dir(f"{run_folder}/{name}")
    if unused:
        log.warning("%s: removed %d checkpoint folder(s) a killed run left unused (unregistered by Ray, partial "
                    "or older than the newest %d complete): %s", run_uri, len(unused), keep, ", ".join(unused))
    return unused

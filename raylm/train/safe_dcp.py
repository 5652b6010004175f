"""Loading a DCP checkpoint without running any code that it contains.

`torch.distributed.checkpoint` keeps two kinds of pickles in a checkpoint: the `.metadata` file, read with
`pickle.load`, and every non-tensor item of the state (the optimizer's `lr`, `betas`, ...), read with
`torch.load(weights_only=False)`. Both run whatever a crafted file tells them to, so a checkpoint from
anyone else (a bucket, a colleague, a download) could execute code in `generate`, an eval actor or a
training worker. Tensors themselves are already read with `weights_only=True`.

`SafeFileSystemReader` reads `.metadata` with an unpickler that builds only the classes DCP metadata is
made of (its dataclasses, `torch.Size`, dtypes, layouts, paths) and refuses anything else, naming the
file and the class; it also refuses shard names that leave the checkpoint folder. `SafeLoadPlanner`
reads the non-tensor items with `torch.load(weights_only=True)`. `load_state` is `dcp.load` with both.
"""

from __future__ import annotations

import io
import os
import pickle
import re
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

DCP_METADATA = ".metadata"

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that asks to build something a checkpoint never holds, or cannot be read at all."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, handle, path: str):
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()) or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self.path}: refusing to load {module}.{name} (DCP metadata holds only "
                                    f"checkpoint dataclasses, sizes, dtypes and paths)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self.path}: refusing a persistent id (DCP metadata has none)")


def read_metadata_file(path: str) -> Metadata:
    with open(path, "rb") as handle:
        try:
            metadata = _MetadataUnpickler(handle, path).load()
        except UnsafeCheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - a truncated or garbled pickle fails in many ways
            raise UnsafeCheckpointError(f"{path}: not readable as DCP metadata ({error})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def check_metadata(folder: str) -> Metadata:
    """The folder's DCP metadata, read safely; its shard files must lie in the folder itself."""
    path = os.path.join(folder, DCP_METADATA)
    metadata = read_metadata_file(path)
    for info in (metadata.storage_data or {}).values():
        name = os.fspath(getattr(info, "relative_path", ""))
        if not name or os.path.basename(name) != name or name in (".", ".."):
            raise UnsafeCheckpointError(f"{path}: names shard file {name!r} outside the checkpoint folder")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """A local DCP reader whose `.metadata` can only describe tensors and shard files in its own folder."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = check_metadata(os.fspath(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """The default planner, except that non-tensor items are unpickled with `weights_only=True`."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as error:
            storage = self.metadata.storage_data.get(read_item.storage_index) if self.metadata else None
            where = getattr(storage, "relative_path", "a shard")
            raise UnsafeCheckpointError(f"{where}: item {read_item.dest_index.fqn!r} refused: {_first_reason(error)}") from None
        # the bytes just passed the weights-only unpickler, so the default (full) unpickler builds the same objects
        super().load_bytes(read_item, io.BytesIO(data))


def _first_reason(error: Exception) -> str:
    text = str(error)
    found = re.search(r"(?:Trying to load unsupported|Unsupported global|Unsupported operand)[^\n]*", text)
    return (found.group(0) if found else text.splitlines()[0] if text else type(error).__name__)[:300]


def load_state(state: dict[str, Any], directory: str) -> None:
    """`dcp.load(state, checkpoint_id=directory)`, reading no pickle that could run code.

    The metadata is checked here first, so that a refusal is one error naming the file rather than
    DCP's per-rank report of it."""
    check_metadata(directory)
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(directory), planner=SafeLoadPlanner())
    except CheckpointException as error:  # a BaseException holding each rank's (exception, stack)
        causes = [wrapped[0] for wrapped in error.failures.values()]
        if causes and isinstance(causes[0], Exception):
            raise causes[0] from None
        raise RuntimeError(str(error).splitlines()[0]) from None

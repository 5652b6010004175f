"""Where stage outputs live.

A workspace is a root folder (local, `s3://` or `gs://`, all through `pyarrow.fs`). Each run of a
stage writes into `<root>/<stage>/<key>`, where the key is a hash of the stage's config section and
the fingerprints of its inputs: the same config on the same inputs lands in the same folder, so a
finished stage is found and reused instead of recomputed.

A stage folder is a result only once its success marker exists. The marker is written last, after
`manifest.json`; a folder without it (a crash mid-write) is never read, and is cleared before the
stage runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

SUCCESS_MARKER = "_SUCCESS"
MANIFEST = "manifest.json"


def content_hash(*parts: Any, length: int = 16) -> str:
    """A stable hash of JSON-able parts (sorted keys, so dict order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the raylm checkout (with `+dirty` when modified), else the package version."""
    from raylm import __version__

    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return f"raylm-{__version__}"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def read_text_uri(uri: str) -> str:
    """A whole text file from a local path or a pyarrow-filesystem URI (s3://, gs://)."""
    if is_remote(uri):
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()


class Workspace:
    """A root folder for stage outputs, local or in an object store."""

    def __init__(self, root: str):
        if is_remote(root):
            self.fs, base = pafs.FileSystem.from_uri(root)
            scheme = root.split("://", 1)[0]
            self.root = f"{scheme}://{base.rstrip('/')}"
            self._base = base.rstrip("/")
        else:
            local = os.path.abspath(root.removeprefix("file://"))
            self.fs = pafs.LocalFileSystem()
            self.root = local
            self._base = local
            os.makedirs(local, exist_ok=True)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def uri(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def fs_path(self, *parts: str) -> str:
        """The path of `parts` as the workspace's pyarrow filesystem understands it."""
        return "/".join([self._base, *parts])

    def stage(self, name: str, config: Any, inputs: dict[str, str] | None = None) -> "StageDir":
        inputs = dict(sorted((inputs or {}).items()))
        key = content_hash(name, config, inputs)
        return StageDir(self, name, key, config, inputs)

    def finished_runs(self, name: str) -> list["StageDir"]:
        """Finished runs of a stage, newest first (for `--resume` and lookups by stage name)."""
        selector = pafs.FileSelector(self.fs_path(name), allow_not_found=True)
        runs = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.Directory:
                continue
            key = info.base_name
            marker = self.fs.get_file_info(self.fs_path(name, key, SUCCESS_MARKER))
            if marker.type == pafs.FileType.File:
                runs.append((marker.mtime_ns or 0, key))
        out = []
        for _, key in sorted(runs, reverse=True):
            stage = StageDir(self, name, key, None, {})
            out.append(stage)
        return out


@dataclass
class StageDir:
    """One run of one stage: `<root>/<stage>/<key>`."""

    workspace: Workspace
    name: str
    key: str
    config: Any
    inputs: dict[str, str]

    @property
    def uri(self) -> str:
        return self.workspace.uri(self.name, self.key)

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self.key}"

    def path(self, *parts: str) -> str:
        """URI (or absolute local path) of a file inside this stage folder."""
        return self.workspace.uri(self.name, self.key, *parts)

    def fs_path(self, *parts: str) -> str:
        return self.workspace.fs_path(self.name, self.key, *parts)

    @property
    def fs(self) -> pafs.FileSystem:
        return self.workspace.fs

    def is_complete(self) -> bool:
        return self.fs.get_file_info(self.fs_path(SUCCESS_MARKER)).type == pafs.FileType.File

    def exists(self) -> bool:
        return self.fs.get_file_info(self.fs_path()).type == pafs.FileType.Directory

    def prepare(self, force: bool = False) -> None:
        """Make an empty folder for a fresh run: clears a half-written one, or a finished one when forced."""
        if self.is_complete() and not force:
            raise RuntimeError(f"{self.uri} is already complete; pass force=True to rerun it")
        if self.exists():
            self.fs.delete_dir(self.fs_path())
        self.fs.create_dir(self.fs_path(), recursive=True)

    def write_text(self, relpath: str, text: str) -> None:
        target = self.fs_path(relpath)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(target) as out:
            out.write(text.encode())

    def read_text(self, relpath: str) -> str:
        with self.fs.open_input_stream(self.fs_path(relpath)) as stream:
            return stream.read().decode()

    def write_json(self, relpath: str, obj: Any) -> None:
        self.write_text(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str))

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.read_text(relpath))

    def finish(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest, then the success marker: from here on the folder is a result."""
        manifest = {
            "stage": self.name,
            "key": self.key,
            "fingerprint": self.fingerprint,
            "uri": self.uri,
            "config": self.config,
            "inputs": self.inputs,
            "code_version": code_version(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **outputs,
        }
        self.write_json(MANIFEST, manifest)
        self.write_text(SUCCESS_MARKER, manifest["finished_at"] + "\n")
        return manifest

    def manifest(self) -> dict[str, Any]:
        if not self.is_complete():
            raise FileNotFoundError(f"{self.uri} has no success marker: it is not a finished {self.name} result")
        return self.read_json(MANIFEST)


def resolve_stage_dir(workspace: Workspace, uri_or_path: str) -> StageDir:
    """A finished stage folder from its URI/path (`<root>/<stage>/<key>`), checked for its marker."""
    clean = uri_or_path.rstrip("/")
    stage_name, key = clean.split("/")[-2:]
    if is_remote(clean):
        owner = Workspace(clean.rsplit("/", 2)[0])
    else:
        owner = Workspace(os.path.dirname(os.path.dirname(os.path.abspath(clean))))
    stage = StageDir(owner, stage_name, key, None, {})
    stage.manifest()  # raises when unfinished
    return stage

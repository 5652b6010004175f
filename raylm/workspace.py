"""Where stage outputs live.

A workspace is a root folder (local, `s3://` or `gs://`, all through `pyarrow.fs`). Each run of a
stage writes into `<root>/<stage>/<key>`, where the key is a hash of the stage's config section and
the fingerprints of its inputs: the same config on the same inputs lands in the same folder, so a
finished stage is found and reused instead of recomputed.

A stage folder is a result only once its commit exists: `<key>/_SUCCESS`, one small JSON object written
last, naming the attempt whose files are the result. Each run of a stage (`execute`) writes into an attempt
folder of its own, `<key>/attempts/<time>-<host>-<pid>-<id>/`, beside an `_OWNER.json` it refreshes while
it runs; readers resolve paths through the commit, so they read exactly one attempt's files. The commit is
created only if absent: `O_EXCL` on a local disk; on an object store a check and then one PUT (no
conditional put is common to S3 and GCS through pyarrow), where two runs committing in the same instant
leave the later commit, and readers still see one whole attempt, never a mix. A second run of a stage
that another live run is writing waits for that run's commit and reuses it. Folders without a commit
(a crash mid-write) are never read; a resumable stage (training) takes the newest abandoned attempt back.
Stages written by older versions (files beside a plain-text `_SUCCESS`) still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from raylm import __version__

SUCCESS_MARKER = "_SUCCESS"
MANIFEST = "manifest.json"
ATTEMPTS = "attempts"
OWNER = "_OWNER.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0

log = logging.getLogger("raylm")


class DamagedManifest(RuntimeError):
    """A finished stage's manifest.json that cannot be read as JSON."""


class StageConflict(RuntimeError):
    """Another run committed the same stage first; this run's attempt was discarded."""


def content_hash(*parts: Any, length: int = 16) -> str:
    """A stable hash of JSON-able parts (sorted keys, so dict order does not matter)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit of the raylm checkout (with `+dirty` when modified), else the package version."""
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


@dataclass(frozen=True)
class AttemptOwner:
    """Who writes an attempt folder, and when it last said it was alive."""

    attempt: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: float

    def is_live(self) -> bool:
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return False
        return time.time() - self.heartbeat_at < STALE_AFTER_S

    def describe(self) -> str:
        return f"attempt {self.attempt} (host {self.host}, pid {self.pid}, started {self.started_at})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StageDir:
    """One run of one stage: `<root>/<stage>/<key>`, its files in the committed (or the current) attempt."""

    workspace: Workspace
    name: str
    key: str
    config: Any
    inputs: dict[str, str]
    attempt: str | None = None  # the attempt this process writes; None: read the committed one
    _heartbeat: threading.Event | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def uri(self) -> str:
        return self.workspace.uri(self.name, self.key)

    @property
    def fingerprint(self) -> str:
        return f"{self.name}:{self.key}"

    def _attempt_parts(self) -> list[str]:
        attempt = self.attempt
        if attempt is None:
            record = self.commit_record()
            attempt = record.get("attempt") if record else None
            if attempt:
                self.attempt = attempt  # committed: it cannot change under this reader
        return [ATTEMPTS, attempt] if attempt else []

    def path(self, *parts: str) -> str:
        """URI (or absolute local path) of a file inside this stage's attempt folder."""
        return self.workspace.uri(self.name, self.key, *self._attempt_parts(), *parts)

    def fs_path(self, *parts: str) -> str:
        return self.workspace.fs_path(self.name, self.key, *self._attempt_parts(), *parts)

    def attempt_uri(self, attempt: str) -> str:
        """URI (or absolute local path) of one attempt folder of this stage, as `path()` gives it."""
        return self.workspace.uri(self.name, self.key, ATTEMPTS, attempt)

    def key_fs_path(self, *parts: str) -> str:
        """A path at the key level (the commit, the attempts), whatever the attempt."""
        return self.workspace.fs_path(self.name, self.key, *parts)

    @property
    def fs(self) -> pafs.FileSystem:
        return self.workspace.fs

    def commit_record(self) -> dict[str, Any] | None:
        """The commit (`_SUCCESS`): {"attempt": ..., ...}; None while the stage is not finished."""
        info = self.fs.get_file_info(self.key_fs_path(SUCCESS_MARKER))
        if info.type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(info.path) as stream:
            text = stream.read().decode()
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):  # written by an older raylm: the files sit beside the marker
            return {"attempt": None, "finished_at": text.strip()}
        return record

    def is_complete(self) -> bool:
        return self.commit_record() is not None

    def exists(self) -> bool:
        return self.fs.get_file_info(self.key_fs_path()).type == pafs.FileType.Directory

    def prepare(self, force: bool = False) -> None:
        """Make an empty key folder for a fresh run: clears a half-written one, or a finished one when forced."""
        if self.is_complete() and not force:
            raise RuntimeError(f"{self.uri} is already complete; pass force=True to rerun it")
        if self.exists():
            self.fs.delete_dir(self.key_fs_path())
        self.fs.create_dir(self.key_fs_path(), recursive=True)
        self.attempt = None

    # --- attempts: one folder per run, owned by one live process -------------------------------------

    def owners(self) -> list[AttemptOwner]:
        """The attempt folders of this stage with their owners, oldest first."""
        selector = pafs.FileSelector(self.key_fs_path(ATTEMPTS), allow_not_found=True)
        found = []
        for info in self.fs.get_file_info(selector):
            if info.type != pafs.FileType.Directory:
                continue
            try:
                with self.fs.open_input_stream(f"{info.path}/{OWNER}") as stream:
                    data = json.loads(stream.read())
                found.append(AttemptOwner(info.base_name, data["host"], int(data["pid"]), data["started_at"],
                                          float(data["heartbeat_at"])))
            except (OSError, ValueError, KeyError, TypeError):  # no owner file (released) or a damaged one
                found.append(AttemptOwner(info.base_name, "?", -1, "?", 0.0))
        return sorted(found, key=lambda owner: owner.attempt)

    def live_owner(self) -> AttemptOwner | None:
        """Another live run writing this stage, if any."""
        return next((o for o in self.owners() if o.attempt != self.attempt and o.is_live()), None)

    def begin(self, resumable: bool = False) -> str:
        """Claim an attempt folder and keep its owner file fresh until `release()`.

        A resumable stage takes back the attempt it was given, or the newest one no live run owns (an
        interrupted training run continues from its checkpoints); any other stage starts a new one.
        """
        if self.attempt is None and resumable:
            abandoned = [o.attempt for o in self.owners() if not o.is_live()]
            self.attempt = abandoned[-1] if abandoned else None
        if self.attempt is None:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            self.attempt = f"{stamp}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fs.create_dir(self.fs_path(), recursive=True)
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._write_owner(started)
        stop = threading.Event()
        self._heartbeat = stop

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    self._write_owner(started)
                except OSError as error:  # a store hiccup: the next beat tries again
                    log.warning("%s: heartbeat not written: %s", self.uri, error)

        threading.Thread(target=beat, name=f"raylm-heartbeat-{self.name}", daemon=True).start()
        return self.attempt

    def _write_owner(self, started_at: str) -> None:
        self.write_json(OWNER, {"host": socket.gethostname(), "pid": os.getpid(), "started_at": started_at,
                                "heartbeat_at": time.time()})

    def release(self) -> None:
        """Stop the heartbeat and drop the owner file: the attempt is no longer being written."""
        if self._heartbeat is not None:
            self._heartbeat.set()
            self._heartbeat = None
        if self.attempt and self.fs.get_file_info(self.fs_path(OWNER)).type == pafs.FileType.File:
            self.fs.delete_file(self.fs_path(OWNER))

    def discard_abandoned(self) -> None:
        """Delete attempt folders that are neither committed nor owned by a live run."""
        record = self.commit_record() or {}
        for owner in self.owners():
            if owner.attempt not in (record.get("attempt"), self.attempt) and not owner.is_live():
                self.fs.delete_dir(self.key_fs_path(ATTEMPTS, owner.attempt))

    # --- files ----------------------------------------------------------------------------------

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

    def finish(self, outputs: dict[str, Any], replace: bool = False) -> dict[str, Any]:
        """Write the manifest, then the commit: from here on the attempt's files are the stage's result.

        Raises StageConflict when another run committed first (unless `replace`, as `--force` does).
        """
        manifest = {
            "stage": self.name,
            "key": self.key,
            "fingerprint": self.fingerprint,
            "uri": self.uri,
            "config": self.config,
            "inputs": self.inputs,
            "code_version": code_version(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"attempt": self.attempt} if self.attempt else {}),
            **outputs,
        }
        self.write_json(MANIFEST, manifest)
        self._commit({"attempt": self.attempt, "finished_at": manifest["finished_at"],
                      "host": socket.gethostname(), "pid": os.getpid()}, replace)
        return manifest

    def _commit(self, record: dict[str, Any], replace: bool) -> None:
        marker = self.key_fs_path(SUCCESS_MARKER)
        body = json.dumps(record).encode()
        if replace and self.fs.get_file_info(marker).type == pafs.FileType.File:
            self.fs.delete_file(marker)
        if self.workspace.is_local:
            try:
                descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                raise StageConflict(f"{self.uri} was committed by another run first") from None
            with os.fdopen(descriptor, "wb") as out:
                out.write(body)
            return
        if self.fs.get_file_info(marker).type == pafs.FileType.File:
            raise StageConflict(f"{self.uri} was committed by another run first")
        with self.fs.open_output_stream(marker) as out:
            out.write(body)

    def uncommit(self) -> None:
        """Remove the commit (to continue a finished training run); its attempt's files stay."""
        self._attempt_parts()  # pin the committed attempt before its record goes
        marker = self.key_fs_path(SUCCESS_MARKER)
        if self.fs.get_file_info(marker).type == pafs.FileType.File:
            self.fs.delete_file(marker)

    def manifest(self) -> dict[str, Any]:
        record = self.commit_record()
        if record is None:
            raise FileNotFoundError(f"{self.uri} has no success marker: it is not a finished {self.name} result")
        parts = [ATTEMPTS, record["attempt"]] if record.get("attempt") else []
        path = self.key_fs_path(*parts, MANIFEST)
        with self.fs.open_input_stream(path) as stream:
            text = stream.read()
        try:
            return json.loads(text)
        except ValueError as error:  # truncated or edited by hand: say which file, do not guess its content
            raise DamagedManifest(f"{path}: the manifest of this finished {self.name} stage is not valid JSON "
                                  f"({error}); rerun the stage with --force {self.name}") from None


def resolve_stage_dir(uri_or_path: str) -> StageDir:
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

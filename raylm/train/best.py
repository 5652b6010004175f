"""The best checkpoint of a run (by val loss), kept out of reach of checkpoint rotation.

`KeepBestCheckpoint` runs in Ray Train's controller, a process of its own, which imports this module to
unpickle the callback: it imports nothing heavy (no torch, MLflow or DCP), so the controller starts fast.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import pyarrow.fs as pafs
import ray.train

BEST_DIR = "best"
BEST_POINTER = "best.json"


class KeepBestCheckpoint(ray.train.UserCallback):
    """On the controller: keep a copy of a reported checkpoint under `<run>/best/` when its val loss is the best yet.

    The copy goes into a folder of its own (`best/step-<step>-<id>`); then `best/best.json`, one small file
    written last, names it, and older copies are deleted. A reader follows `best.json` (`best_checkpoint`), so
    it never loads a half-copied checkpoint, on a local disk or on an object store, which has no atomic move
    of a folder. Stateless across restarts: the best so far is read back from `best.json`.
    """

    def __init__(self, run_uri: str):
        self.fs, self.base = pafs.FileSystem.from_uri(run_uri.rstrip("/") + "/" + BEST_DIR)
        self.best: float | None = None

    def _best_so_far(self) -> float:
        if self.best is None:
            pointer = read_best_pointer(self.fs, self.base)
            self.best = float(pointer["val_loss"]) if pointer else math.inf
        return self.best

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if checkpoint is None or not metrics or not metrics[0].get("evaluated") or "val_loss" not in metrics[0]:
            return  # only checkpoints whose val loss was measured at that step
        val_loss = float(metrics[0]["val_loss"])
        if not val_loss < self._best_so_far():
            return
        folder = f"step-{int(metrics[0].get('step', 0)):07d}-{uuid.uuid4().hex[:8]}"
        self.fs.create_dir(f"{self.base}/{folder}", recursive=True)
        pafs.copy_files(checkpoint.path, f"{self.base}/{folder}", source_filesystem=checkpoint.filesystem,
                        destination_filesystem=self.fs)
        pointer = json.dumps({"val_loss": val_loss, "step": metrics[0].get("step"), "folder": folder,
                              "source": checkpoint.path}).encode()
        if isinstance(self.fs, pafs.LocalFileSystem):  # a rename replaces the file atomically
            with self.fs.open_output_stream(f"{self.base}/{BEST_POINTER}.tmp") as out:
                out.write(pointer)
            self.fs.move(f"{self.base}/{BEST_POINTER}.tmp", f"{self.base}/{BEST_POINTER}")
        else:  # one PUT: readers see the old object or the new one, never a part
            with self.fs.open_output_stream(f"{self.base}/{BEST_POINTER}") as out:
                out.write(pointer)
        for info in self.fs.get_file_info(pafs.FileSelector(self.base)):
            if info.type == pafs.FileType.Directory and info.base_name != folder:
                self.fs.delete_dir(info.path)
        self.best = val_loss


def read_best_pointer(fs: pafs.FileSystem, best_dir: str) -> dict[str, Any] | None:
    info = fs.get_file_info(f"{best_dir}/{BEST_POINTER}")
    if info.type != pafs.FileType.File:
        return None
    with fs.open_input_stream(info.path) as stream:
        return json.loads(stream.read())


def best_checkpoint(run_uri: str) -> str | None:
    """The best checkpoint's folder as `best.json` names it (None before the first evaluated checkpoint)."""
    best_uri = run_uri.rstrip("/") + "/" + BEST_DIR
    fs, base = pafs.FileSystem.from_uri(best_uri)
    pointer = read_best_pointer(fs, base)
    if pointer is None:
        return None
    return f"{best_uri}/{pointer['folder']}" if pointer.get("folder") else best_uri  # older runs: files in best/

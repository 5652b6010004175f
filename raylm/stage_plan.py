"""Where each stage of a config's pipeline lives, decided from the config alone.

A stage folder is named by a hash of its config section and its upstream stage's fingerprint (and, for
curation, of the source files' names, sizes and times), so any single stage, `raylm eval` or
`raylm plan` finds the outputs it builds on without running or importing the pipeline.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from raylm.config import RaylmConfig
from raylm.data.sources import list_source_files
from raylm.workspace import StageDir, Workspace


def source_fingerprint(config: RaylmConfig) -> str:
    """Names, sizes and modification times of local source files: an edited corpus is a new input."""
    digest = hashlib.sha256()
    for source in config.data.sources:
        if "://" in source.path and not source.path.startswith("file://"):
            digest.update(source.path.encode())
            continue
        files, _, _ = list_source_files(source)
        for path in files:
            stat = os.stat(path)
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(path: str | None) -> str | None:
    """`tokenizer.path` as a stage input: the hash of tokenizer.json (also inside a folder); an MLflow
    `runs:/` URI names immutable artifacts, so it is its own fingerprint."""
    if path is None or path.startswith("runs:/"):
        return path
    return file_fingerprint(os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path)


def file_fingerprint(path: str | None) -> str | None:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()[:16]


@dataclass
class StagePlan:
    curate: StageDir
    tokenize: StageDir
    pretrain: StageDir
    eval: StageDir


def plan_stages(config: RaylmConfig, workspace: Workspace) -> StagePlan:
    curate = workspace.stage("curate", {"data": config.section("data"), "files": source_fingerprint(config)})
    tokenize = workspace.stage(
        "tokenize",
        {"tokenizer": config.section("tokenizer"), "tokenizer_file": tokenizer_fingerprint(config.tokenizer.path),
         "seq_len": config.model.seq_len},
        {"curated": curate.fingerprint},
    )
    pretrain = workspace.stage("pretrain", {"model": config.section("model"), "train": config.section("train")},
                               {"packed": tokenize.fingerprint})
    evaluation = workspace.stage("eval", {"eval": config.section("eval")}, {"checkpoint": pretrain.fingerprint})
    return StagePlan(curate, tokenize, pretrain, evaluation)

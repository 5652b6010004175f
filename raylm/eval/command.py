"""`raylm eval --checkpoint PATH_OR_RUN --tasks ...`: evaluate any checkpoint and log it to MLflow.

The checkpoint is a path or URI, the MLflow run id of the training run that made it (its
`raylm.checkpoint` tag), or a registered model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`); the
scores are also logged against the logged model registered from that run, and `bpb/val` moves the
alias `@best-bpb` (raylm/registry.py). Results go to a workspace folder `benchmarks/<hash of settings and
checkpoint>` (manifest, per-sample jsonl, summary) and to an MLflow run that is a child of the
checkpoint's run. `bpb` is the bits-per-byte of the curated val split's text (tokenizer-independent,
through `loglikelihood_rolling`); `domain` defaults to that split too.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from raylm import tracking
from raylm.artifacts import Curated
from raylm.config import RaylmConfig
from raylm.eval.domain import read_texts
from raylm.eval.suite import (
    EvalSettings,
    evaluate_checkpoint,
    log_to_mlflow,
    prepare_tasks,
    resolve_checkpoint,
    summary_text,
)
from raylm.eval.tasks import EvalInputError
from raylm.registry import checkpoint_for, is_model_uri, record_scores
from raylm.stage_plan import plan_stages
from raylm.tracking import Tracker
from raylm.workspace import Workspace, content_hash

log = logging.getLogger("raylm")


def looks_like_run_id(reference: str) -> bool:
    return len(reference) == 32 and all(c in "0123456789abcdef" for c in reference)


def check_checkpoint_reference(reference: str) -> None:
    """Before MLflow or Ray: a local checkpoint folder has its files; anything else local must be an MLflow run id."""
    # deferred: pulls in torch, slow to import; only this path needs it
    from raylm.train.checkpoint import CheckpointError, check_complete

    if "://" in reference or is_model_uri(reference):
        return  # read (and checked) by the actors; a registered model is looked up in MLflow next
    path = reference.removeprefix("file://")
    if os.path.isdir(path):
        try:
            check_complete(path)
        except CheckpointError as error:
            raise EvalInputError(f"--checkpoint {reference}: {error}") from None
    elif not looks_like_run_id(reference):
        raise EvalInputError(f"--checkpoint {reference}: no such checkpoint folder, and not an MLflow run id "
                             f"(32 hex digits)")


def curated_val_split(config: RaylmConfig) -> str | None:
    """The curated val split of this config's pipeline, when its curate stage has finished locally."""
    try:
        stage = plan_stages(config, Workspace(config.workspace.root)).curate
        if stage.is_complete():
            return Curated.from_manifest(stage.manifest()).val_uri
    except Exception as error:  # noqa: BLE001 - no pipeline for this config: the caller says what is missing
        log.debug("no curated val split: %s", error)
    return None


def val_text_file(val_split: str, limit: int | None, directory: str) -> str:
    path = os.path.join(directory, "val.txt")
    with open(path, "w", encoding="utf-8") as handle:
        for count, text in enumerate(read_texts(val_split)):
            if limit is not None and count >= limit:
                break
            handle.write(text + "\n\n")
    return path


def run_eval_command(config: RaylmConfig, checkpoint_ref: str, overrides: dict[str, Any],
                     force: bool = True) -> dict[str, Any]:
    # deferred: pulls in ray, slow to import; only this path needs it
    from raylm.runtime import init_ray

    settings = EvalSettings.from_config(config.eval, **overrides)
    check_checkpoint_reference(checkpoint_ref)
    workspace = Workspace(config.workspace.root)
    tracker = Tracker(config.tracking, workspace)
    if is_model_uri(checkpoint_ref):
        checkpoint, source_run = checkpoint_for(checkpoint_ref, tracker.uri)
    else:
        checkpoint, source_run = resolve_checkpoint(checkpoint_ref, tracker.client)
    check_checkpoint_reference(checkpoint)
    val_split = curated_val_split(config) if ({"bpb", "domain"} & set(settings.tasks)) else None
    if "domain" in settings.tasks and not settings.domain_data:
        if val_split is None:
            raise ValueError("the domain task needs held-out text: set eval.domain_data or run `raylm curate` first")
        settings.domain_data = val_split
    stage = workspace.stage("benchmarks", settings.__dict__, {"checkpoint": content_hash(checkpoint)})
    if not force and stage.is_complete():  # `raylm pipeline` run again: the same tasks on the same checkpoint
        log.info("eval: reusing finished benchmarks %s", stage.uri)
        manifest = stage.manifest()
        manifest["table"] = summary_text({"summary": manifest["summary"]})
        return manifest
    stage.prepare(force=True)
    with tempfile.TemporaryDirectory(prefix="raylm-eval-") as scratch:
        out_dir = stage.fs_path() if workspace.is_local else scratch
        prepared = prepare_tasks(settings, out_dir)  # every input read and checked before Ray starts
        init_ray(config.cluster)
        if val_split is None and "bpb" in settings.tasks:
            log.warning("eval: no curated val split for this config (run `raylm curate`): skipping bpb")
            settings.tasks = [t for t in settings.tasks if t != "bpb"]
        names = {}
        if "bpb" in settings.tasks:  # the val split's figure is `bpb/val`, whatever the --text-file names
            val_file = val_text_file(val_split, settings.limit, scratch)
            settings.text_files, names[val_file] = [*settings.text_files, val_file], "val"
            settings.tasks = [t for t in settings.tasks if t != "bpb"]
        results = evaluate_checkpoint(checkpoint, settings, out_dir, text_names=names, prepared=prepared)
        run_id = log_to_mlflow(results, settings, tracker, source_run, out_dir)
        models = record_scores(tracker.client, source_run, results["metrics"], "bpb/val", run_id=run_id,
                               dataset=tracking.dataset("curated/val", val_split, plan_stages(config, workspace).curate.key)
                               if val_split else None)
    manifest = stage.finish({"metrics": results["metrics"], "summary": results["summary"], "checkpoint": checkpoint,
                             "source_run": source_run, "mlflow_run_id": run_id, "tasks": results["tasks"]})
    manifest["table"] = summary_text(results)
    manifest["models"] = models
    manifest["sandbox_isolation"] = results.get("sandbox_isolation")
    return manifest

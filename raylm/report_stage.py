"""`raylm report`: gather a config's finished stages from the workspace and MLflow, and write the report card.

The report is a stage of its own (`report/<key>`, its inputs the fingerprints of the stages it shows), so
it lands in the workspace like every other output, with an MLflow run whose artifacts are `report.md`,
`report.html` and the figures. It is written again each time it is asked for: the tuning, fine-tuning and
benchmark runs it shows can change without the config changing. What it reads: stage manifests (JSON),
MLflow tags, metrics and JSON artifacts, and the final checkpoint through the safe loader for a few greedy
samples. Nothing here starts Ray.
"""

from __future__ import annotations

import json
import logging
import warnings
from typing import Any

from raylm import tracking
from raylm.config import RaylmConfig
from raylm.report import PLAN_STAGES, ReportData, figures, render_html, render_markdown
from raylm.stage import run_stage
from raylm.stage_plan import plan_stages
from raylm.tracking import Tracker
from raylm.workspace import StageDir, Workspace

log = logging.getLogger("raylm")

SAMPLE_PROMPT_CHARS = 48
SAMPLE_NEW_TOKENS = 40


class NothingToReport(RuntimeError):
    """No stage of this config has finished."""


def finished_manifests(config: RaylmConfig) -> dict[str, dict[str, Any]]:
    """Manifests of the config's planned stages that finished; NothingToReport when none did."""
    workspace = Workspace(config.workspace.root)
    plan = plan_stages(config, workspace)
    if config.pipeline.tune and plan.tokenize.is_complete():  # the pipeline pretrained with the sweep's best values
        # deferred: pulls in ray's Tune helpers; only this path needs it
        from raylm.tune import tuned_config

        plan = plan_stages(tuned_config(config, workspace, plan.tokenize.fingerprint), workspace)
    manifests = {}
    for name in PLAN_STAGES:
        stage: StageDir = getattr(plan, name)
        if stage.is_complete():
            manifests[name] = stage.manifest()
    if not manifests:
        raise NothingToReport(f"no stage of this config has finished under {workspace.root}: run `raylm pipeline` first")
    return manifests


def collect(config: RaylmConfig, tracker: Tracker, samples: int = 3) -> ReportData:
    """The report's data for `config`: its planned stages' manifests, the pretraining curves, the newest tune
    sweep and fine-tuning on its data and model, the benchmark scores of its final checkpoint, samples."""
    # deferred: plan pulls in torch sizing helpers; only this path needs it
    from raylm.plan import format_table, make_plan

    data = ReportData(experiment=config.tracking.experiment, workspace=config.workspace.root,
                      manifests=finished_manifests(config))
    data.plan_table = format_table(make_plan(config))
    client = tracker.client
    for name, manifest in data.manifests.items():
        data.run_tags[name] = _run_tags(client, manifest.get("mlflow_run_id"))
    pretrain_run = data.manifests.get("pretrain", {}).get("mlflow_run_id")
    if pretrain_run:
        for metric in ("step_loss", "val_loss", "tokens_per_s", "mfu"):
            data.curves[metric] = tracking.metric_history(tracker.uri, pretrain_run, metric)
    tokenize = data.manifests.get("tokenize")
    if tokenize:
        sweep = _newest_manifest(tracker, {"raylm.stage": "tune", "raylm.input.packed": tokenize["fingerprint"]})
        if sweep:
            data.manifests["tune"] = sweep
            data.trials = list(sweep.get("trials", []))
            data.tune_metric = (sweep.get("best") or {}).get("metric", data.tune_metric)
    pretrained = data.manifests.get("pretrain")
    final_checkpoint = pretrained["checkpoint"] if pretrained else None
    if pretrained:
        tuned = _newest_manifest(tracker, {"raylm.stage": "finetune"},
                                 lambda m: (m.get("base") or {}).get("checkpoint") == pretrained["checkpoint"])
        if tuned:
            data.manifests["finetune"] = tuned
            final_checkpoint = tuned["checkpoint"]
    if final_checkpoint:
        data.scores = _benchmark_scores(tracker, final_checkpoint)
        if samples:
            data.samples = _samples(final_checkpoint, data.manifests.get("curate"), samples)
    return data


def _run_tags(client, run_id: str | None) -> dict[str, str]:
    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.tags)
    except tracking.MlflowException:  # a store that lost the run (e.g. a new tracking.uri)
        return {}


def _newest_runs(tracker: Tracker, tags: dict[str, str]) -> list[Any]:
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    return tracker.client.search_runs([tracker.experiment_id], filter_string=f"{query} and attributes.status = 'FINISHED'",
                                      order_by=["attributes.start_time DESC"], max_results=50)


def _read_json_artifact(tracker: Tracker, run_id: str, name: str) -> dict[str, Any] | None:
    try:
        path = tracking.download_run_artifact(run_id, name, tracker.uri)
    except (tracking.MlflowException, OSError):
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _newest_manifest(tracker: Tracker, tags: dict[str, str], accept=lambda manifest: True) -> dict[str, Any] | None:
    """The manifest.json of the newest finished run with these tags that `accept` takes."""
    for run in _newest_runs(tracker, tags):
        manifest = _read_json_artifact(tracker, run.info.run_id, "manifest.json")
        if manifest is not None and accept(manifest):
            return manifest
    return None


def _benchmark_scores(tracker: Tracker, checkpoint: str) -> list[dict[str, Any]]:
    """The summary rows of the newest benchmark evaluation of `checkpoint` (`raylm eval --tasks ...`)."""
    for run in _newest_runs(tracker, {"raylm.stage": "eval", "raylm.checkpoint": checkpoint}):
        results = _read_json_artifact(tracker, run.info.run_id, "results.json")
        if results and results.get("summary"):
            return list(results["summary"])
    return []


def _samples(checkpoint: str, curated: dict[str, Any] | None, count: int) -> list[tuple[str, str]]:
    """Greedy continuations of the openings of the first held-out documents."""
    # deferred: pulls in torch, slow to import; only this path needs it
    import pyarrow.dataset as pads
    import torch

    from raylm.data.tokenizer import tokenizer_from_json
    from raylm.model.generate import generate_text
    from raylm.train.checkpoint import CheckpointError, load_model, load_tokenizer_json, local_checkpoint

    prompts = []
    split = (curated or {}).get("outputs", {}).get("val") or (curated or {}).get("outputs", {}).get("train")
    if split:
        for batch in pads.dataset(split, format="parquet").to_batches(columns=["text"], batch_size=64):
            prompts += [text[:SAMPLE_PROMPT_CHARS] for text in batch.column("text").to_pylist() if text and text.strip()]
            if len(prompts) >= count:
                break
    prompts = prompts[:count] or ["The "]
    try:
        with local_checkpoint(checkpoint) as directory, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP read in one process
            model, tokenizer_json = load_model(directory), load_tokenizer_json(directory)
    except (CheckpointError, OSError) as error:
        log.warning("report: no samples, the checkpoint %s does not load: %s", checkpoint, error)
        return []
    if tokenizer_json is None:
        return []
    texts = generate_text(model, tokenizer_from_json(tokenizer_json), prompts, SAMPLE_NEW_TOKENS,
                          generator=torch.Generator().manual_seed(0))
    return list(zip(prompts, texts))


def write_report(config: RaylmConfig, tracker: Tracker, samples: int = 3) -> dict[str, Any]:
    """Gather, render and write the report as the `report` stage; its manifest (with the two files' paths)."""
    data = collect(config, tracker, samples)
    inputs = {name: manifest["fingerprint"] for name, manifest in data.manifests.items() if manifest.get("fingerprint")}
    stage = Workspace(config.workspace.root).stage("report", {"experiment": data.experiment}, inputs)

    def body(stage: StageDir) -> dict[str, Any]:
        pictures = figures(data)
        markdown = render_markdown(data, list(pictures))
        page = render_html(data, pictures)
        stage.write_text("report.md", markdown)
        stage.write_text("report.html", page)
        stage.fs.create_dir(stage.fs_path("figures"), recursive=True)
        for name, png in pictures.items():
            with stage.fs.open_output_stream(stage.fs_path("figures", name)) as handle:
                handle.write(png)
        tracking.log_files({"report.md": markdown, "report.html": page, **pictures}, "report")
        return {"outputs": {"markdown": stage.path("report.md"), "html": stage.path("report.html")},
                "metrics": {"figures": len(pictures), "samples": len(data.samples), "scores": len(data.scores)}}

    return run_stage(stage, {"experiment": data.experiment}, tracker, body, force=True)


def report_paths(manifest: dict[str, Any]) -> tuple[str, str]:
    outputs = manifest["outputs"]
    return outputs["markdown"], outputs["html"]


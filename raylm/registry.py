"""Trained checkpoints as MLflow models: logged, registered, found again by `models:/` URIs, scored.

After pretrain and finetune, `log_checkpoint_model` turns the stage's best checkpoint into an MLflow 3
logged model under the stage's run: the weights as `model.safetensors`, `model_config.json` and
`tokenizer.json` beside them, and a pyfunc built from code (`raylm/serving/pyfunc_model.py`), so
loading it unpickles nothing. The model is registered under `tracking.registered_model` (default: the
experiment's name; fine-tuned models under `<name>-finetune`), one new version per run, tagged with the
run's lineage (config hash, code version, stage fingerprint and input fingerprints) and the checkpoint URI.

`models:/NAME/VERSION` and `models:/NAME@ALIAS` are accepted wherever a checkpoint is taken:
`checkpoint_for` maps them to the version's checkpoint (`raylm.checkpoint` tag), or fails in one line
naming the reference and listing the registered versions. Eval links its scores to the logged model
(`record_scores`) and moves the alias `best-bpb` to the version with the lowest held-out bits-per-byte.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from typing import Any

from raylm import tracking
from raylm.config import TrackingConfig
from raylm.failure import chatter_to_log
from raylm.serving import MODEL_CONFIG, PARAM_DEFAULTS, TOKENIZER, WEIGHTS

log = logging.getLogger("raylm")

PYFUNC_CODE = os.path.join(os.path.dirname(__file__), "serving", "pyfunc_model.py")
MODEL_ARTIFACT = "model"
BEST_BPB_ALIAS = "best-bpb"
BPB_TAG = "raylm.val_bpb"
CHECKPOINT_TAG = "raylm.checkpoint"
REFERENCE = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))/?")
INPUT_EXAMPLE_PROMPT = "The quick brown fox"


class ModelReferenceError(ValueError):
    """A `models:/` URI that names no registered model version."""


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    version: str
    model_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def registered_name(config: TrackingConfig, stage: str) -> str:
    base = config.registered_model or config.experiment
    return base if stage == "pretrain" else f"{base}-{stage}"


def is_model_uri(reference: str) -> bool:
    return reference.startswith("models:/")


def pip_requirements() -> list[str]:
    """What the pyfunc needs besides raylm itself (which `--env-manager local` and a raylm install provide)."""
    from importlib.metadata import version  # deferred: only logging a model reads package versions

    return [f"{package}=={version(package)}" for package in ("mlflow", "torch", "safetensors", "tokenizers", "pydantic")]


def write_model_files(checkpoint: str, directory: str) -> dict[str, str]:
    """`model.safetensors`, `model_config.json`, `tokenizer.json` of a verified checkpoint in `directory`;
    the pyfunc's artifacts (key -> path)."""
    # deferred: pulls in torch, slow to import; only logging a model needs it
    from safetensors.torch import save_model
    from raylm.train.checkpoint import load_model, load_model_config, load_tokenizer_json, local_checkpoint

    with local_checkpoint(checkpoint) as folder:
        model = load_model(folder)
        config = load_model_config(folder).to_dict()
        tokenizer_json = load_tokenizer_json(folder)
    if tokenizer_json is None:
        raise FileNotFoundError(f"checkpoint {checkpoint} has no tokenizer.json: it cannot be served")
    files = {WEIGHTS: os.path.join(directory, "model.safetensors"),
             MODEL_CONFIG: os.path.join(directory, "model_config.json"),
             TOKENIZER: os.path.join(directory, "tokenizer.json")}
    save_model(model, files[WEIGHTS])  # shared (tied) tensors are stored once
    with open(files[MODEL_CONFIG], "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    with open(files[TOKENIZER], "w", encoding="utf-8") as handle:
        handle.write(tokenizer_json)
    return files


def log_checkpoint_model(checkpoint: str, config: TrackingConfig, stage: str) -> RegisteredModel | None:
    """Log `checkpoint` as a pyfunc model of the active run and register it (a new version); None when
    `tracking.register_models` is off or no run is active."""
    run_id = tracking.active_run_id()
    if not config.register_models or run_id is None:
        return None
    run_tags = tracking.client().get_run(run_id).data.tags
    lineage = {k: v for k, v in run_tags.items() if k.startswith("raylm.") and k not in ("raylm.output", "raylm.reused")}
    lineage.update({CHECKPOINT_TAG: checkpoint, "raylm.stage": stage})
    name = registered_name(config, stage)
    # unless --verbose, what torch and MLflow print while the model is written and registered (DCP's
    # single-process notice, MLflow's type-hint advice and "Successfully registered model") goes to the run log
    with chatter_to_log("raylm"), tempfile.TemporaryDirectory(prefix="raylm-model-") as scratch:
        artifacts = write_model_files(checkpoint, scratch)
        if config.log_transformers:
            log_hf_export(checkpoint, os.path.join(scratch, "hf"), lineage)
        model_uri, model_id = tracking.log_code_model(
            PYFUNC_CODE, artifacts, PARAM_DEFAULTS, ([INPUT_EXAMPLE_PROMPT], {"max_new_tokens": 8}),
            pip_requirements(), lineage, artifact_name=MODEL_ARTIFACT)
        version = tracking.register_model(model_uri, name, lineage)
    registered = RegisteredModel(name=name, version=version, model_id=model_id)
    tracking.set_tags({"raylm.model_uri": registered.uri, "raylm.model_id": model_id or ""})
    log.info("%s: registered %s (logged model %s)", stage, registered.uri, model_id)
    return registered


def log_hf_export(checkpoint: str, folder: str, tags: dict[str, str]) -> str | None:
    """The checkpoint's Hugging Face export logged with MLflow's transformers flavor (its model URI, also the
    run's tag `raylm.hf_model_uri`); None, with the reason in the log, for a model that does not export."""
    # deferred: pulls in torch and transformers, slow to import; only this path needs it
    from raylm.model.hf import ExportError, export_hf
    from raylm.train.checkpoint import load_model, load_model_config, load_tokenizer_json, local_checkpoint

    with local_checkpoint(checkpoint) as directory:
        config, model, tokenizer_json = load_model_config(directory), load_model(directory), load_tokenizer_json(directory)
    try:
        export_hf(model, config, tokenizer_json, folder)
    except ExportError as error:
        log.info("not logging a transformers model of %s: %s", checkpoint, error)
        return None
    uri = tracking.log_transformers_pipeline(folder, tags)
    tracking.set_tag("raylm.hf_model_uri", uri)
    return uri


def _versions_line(client: Any, name: str) -> str:
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    if not versions:
        known = sorted(m.name for m in client.search_registered_models())
        return f"no registered model {name!r} (registered: {', '.join(known) or 'none'})"
    aliases: dict[str, list[str]] = {}
    for alias, number in client.get_registered_model(name).aliases.items():  # searches leave aliases out
        aliases.setdefault(str(number), []).append(alias)
    shown = [f"{v.version}" + (f" (@{', @'.join(sorted(aliases[str(v.version)]))})" if str(v.version) in aliases else "")
             for v in versions]
    return f"registered versions of {name!r}: {', '.join(shown)}"


def find_version(reference: str, tracking_uri: str | None):
    """The ModelVersion a `models:/NAME/VERSION` or `models:/NAME@ALIAS` URI names; ModelReferenceError
    naming the reference and the registered versions otherwise."""
    match = REFERENCE.fullmatch(reference)
    if not match:
        raise ModelReferenceError(f"{reference}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    client = tracking.client(tracking_uri)
    name, version, alias = match["name"], match["version"], match["alias"]
    found = tracking.model_version(client, name, version, alias)
    if found is not None:
        return found
    which = f"version {version}" if version is not None else f"alias @{alias}"
    raise ModelReferenceError(f"{reference}: no {which} of model {name!r} in {tracking_uri or 'the MLflow store'}; "
                              f"{_versions_line(client, name)}")


def checkpoint_for(reference: str, tracking_uri: str | None) -> tuple[str, str | None]:
    """(checkpoint, producing run id) for a `models:/` URI; any other reference comes back unchanged."""
    if not is_model_uri(reference):
        return reference, None
    version = find_version(reference, tracking_uri)
    tags = dict(version.tags)
    checkpoint = tags.get(CHECKPOINT_TAG)
    if not checkpoint and version.run_id:
        checkpoint = tracking.client(tracking_uri).get_run(version.run_id).data.tags.get(CHECKPOINT_TAG)
    if not checkpoint:
        raise ModelReferenceError(f"{reference}: version {version.version} of {version.name!r} names no checkpoint "
                                  f"(no {CHECKPOINT_TAG} tag: not registered by raylm)")
    return checkpoint, version.run_id


def model_id_of(version: Any) -> str | None:
    """The logged model a registered version was made from (a SQLite store keeps it only as the source URI)."""
    source = version.source or ""
    return version.model_id or (source.removeprefix("models:/") if source.startswith("models:/m-") else None)


def versions_of_run(client: Any, run_id: str | None) -> list[Any]:
    return list(client.search_model_versions(f"run_id = '{run_id}'")) if run_id else []


def record_scores(client: Any, source_run: str | None, metrics: dict[str, float],
                  bpb_key: str | None, dataset: Any = None, run_id: str | None = None) -> list[str]:
    """Link `metrics` to the logged model(s) registered from `source_run` (logged in run `run_id`, default
    the active run, with the dataset they were measured on), and move `@best-bpb` to the version with the
    lowest `bpb_key` figure so far. The model URIs touched."""
    touched = []
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
    run_id = run_id or tracking.active_run_id()
    for version in versions_of_run(client, source_run):
        model_id = model_id_of(version)
        if model_id and numeric and run_id:
            tracking.log_model_metrics(numeric, run_id, model_id, dataset)
        if bpb_key and bpb_key in numeric:
            set_best_bpb(client, version, numeric[bpb_key])
        touched.append(f"models:/{version.name}/{version.version}")
    return touched


def set_best_bpb(client: Any, version: Any, bpb: float) -> bool:
    """Tag the version with its bits-per-byte; point `@best-bpb` at it when it beats the current holder."""
    client.set_model_version_tag(version.name, version.version, BPB_TAG, repr(bpb))
    holder = tracking.model_version(client, version.name, alias=BEST_BPB_ALIAS)
    held = float(dict(holder.tags).get(BPB_TAG, "inf")) if holder is not None else float("inf")
    if holder is not None and str(holder.version) != str(version.version) and not bpb < held:
        return False
    client.set_registered_model_alias(version.name, BEST_BPB_ALIAS, version.version)
    log.info("eval: models:/%s@%s -> version %s (val bits-per-byte %.4f)", version.name, BEST_BPB_ALIAS,
             version.version, bpb)
    return True

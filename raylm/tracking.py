"""MLflow tracking for every stage.

By default the store is SQLite inside the workspace (`<workspace>/mlflow.db`) with artifacts beside
it (`<workspace>/mlartifacts`), so a laptop run needs no server. `MLFLOW_TRACKING_URI` or
`tracking.uri` point at a shared server on a cluster.

A pipeline is one parent run with a nested run per stage. Each stage run carries its config as params
(`section.key`), its figures as metrics, its manifest as an artifact, and lineage tags: the input
fingerprints, the config hash, the code version and, for models, the checkpoint URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
import warnings
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from raylm.config import ConfigError, TrackingConfig
from raylm.workspace import StageDir, Workspace, code_version, content_hash

TAG_PREFIX = "raylm."
# The experiment's kind, which earlier MLflow 3 UIs read to open it on the runs table and metric charts (model
# training) rather than the GenAI traces overview. 3.17's UI ignores it (see MODEL_TRAINING_VIEW); it stays
# as the experiment's label for tools that read it.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
MAX_PARAM_LENGTH = 6000

# MLflow's UI charts a run's metrics in one section per name prefix. raylm's own names stay flat everywhere
# else (manifests, Tune's reports, the code); they get their section here, where they enter MLflow, and
# `metric_name` is also how a reader finds them again: `train/` (loss, lr, tokens seen), `val/` (`val_loss`
# -> `val/loss`; eval's figures), `system/` (throughput, MFU, workers, restarts, times), `data/` (every figure
# of curate and tokenize), and the stage's own name for the rest (a sweep's `tune/trials`). A name that
# already has a section (eval's `arc_easy/acc`, one section per task) keeps it.
TRAINING_STAGES = frozenset({"pretrain", "finetune", "tune-trial"})
DATA_STAGES = frozenset({"curate", "tokenize"})
SYSTEM_FIGURES = frozenset({"mfu", "workers", "grad_accum_steps", "restarts", "cpus_per_worker", "torch_threads",
                            "checkpoints_refused", "checkpoints_rotated", "resumed_from_step", "gpu_mem_peak_gib",
                            "rss_peak_gib", "rss_before_data_gib"})


def metric_name(key: str, stage: str | None) -> str:
    """The MLflow name of raylm figure `key` logged by a run of `stage` (its `raylm.stage` tag)."""
    if "/" in key or not stage:
        return key
    if key in SYSTEM_FIGURES or key.endswith(("_s", "_seconds")):
        return f"system/{key}"
    if stage in DATA_STAGES:
        return f"data/{key}"
    if key.startswith("data_"):  # a fine-tuning run's data accounting
        return f"data/{key.removeprefix('data_')}"
    if key.startswith("val_"):
        return f"val/{key.removeprefix('val_')}"
    if stage == "eval":
        return f"val/{key}"
    return f"train/{key}" if stage in TRAINING_STAGES else f"{stage}/{key}"


def _run_stage(run: Any) -> str | None:
    return run.data.tags.get(f"{TAG_PREFIX}stage") if run is not None else None


def resolve_tracking_uri(config: TrackingConfig, workspace: Workspace) -> str:
    uri = config.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if not workspace.is_local:
        raise ConfigError(
            ["tracking.uri: a remote workspace needs a shared MLflow server "
             "(set tracking.uri or MLFLOW_TRACKING_URI, e.g. http://mlflow:5000)"]
        )
    return f"sqlite:///{os.path.join(workspace.root, 'mlflow.db')}"


# MLflow 3.x's UI (3.17 checked) picks an experiment's view from its sidebar switch, "GenAI" or "Model training",
# remembered per browser and GenAI at first; it no longer reads `mlflow.experimentKind`. A link carrying
# `workflowType=machine_learning` opens on the runs table (the UI's sidebar links keep it).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(server: str, experiment_id: str | None) -> str:
    """The experiment's page in the MLflow UI at `server`, in the model-training view."""
    page = f"#/experiments/{experiment_id}" if experiment_id else "#/experiments"
    return f"{server.rstrip('/')}/{page}?{MODEL_TRAINING_VIEW}"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """How to look at the runs: the server's experiment page to open, or for a local store the `mlflow ui`
    command and then that page."""
    if uri.startswith(("http://", "https://")):
        return f"open {experiment_url(uri, experiment_id)}"
    return (f"mlflow ui --backend-store-uri {uri} --port 5000, "
            f"then open {experiment_url('http://127.0.0.1:5000', experiment_id)}")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


@contextlib.contextmanager
def sqlite_store_lock(uri: str) -> Iterator[None]:
    """For a SQLite store: hold an exclusive file lock beside the database while it is first opened.

    MLflow creates and migrates a new SQLite store's tables on first use; two processes doing that at
    once (two jobs started together on one workspace) make one fail with SQLAlchemy's
    CircularDependencyError or "table already exists". Other stores need no lock.
    """
    if not uri.startswith("sqlite:///"):
        yield
        return
    database = uri.removeprefix("sqlite:///")
    os.makedirs(os.path.dirname(os.path.abspath(database)), exist_ok=True)
    with open(database + ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def server_problem(uri: str, error: Exception) -> str:
    """One line for a tracking server that refuses us or cannot be reached."""
    status = error.get_http_status_code() if hasattr(error, "get_http_status_code") else None
    if status in (401, 403):
        given = "MLFLOW_TRACKING_USERNAME" in os.environ and "MLFLOW_TRACKING_PASSWORD" in os.environ
        what = "rejected MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD" if given else \
            "asks for credentials: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        return f"tracking.uri = {uri!r}: the MLflow server {what} (HTTP {status})"
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"tracking.uri = {uri!r}: the MLflow server cannot be used ({first[:300]})"


class Tracker:
    """The MLflow side of a raylm command: one experiment, an optional parent run, stage runs."""

    def __init__(self, config: TrackingConfig, workspace: Workspace):
        self.uri = resolve_tracking_uri(config, workspace)
        self.workspace = workspace
        self.experiment_name = config.experiment
        user_setting = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        # MLflow exports the URI to the environment; undo that so the next config resolves afresh.
        if user_setting is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = user_setting
        with sqlite_store_lock(self.uri):  # the client opens (and on first use creates) the store
            self.client = MlflowClient(self.uri)
            try:
                self.experiment_id = self._ensure_experiment()
            except mlflow.exceptions.MlflowException as error:
                raise ConfigError([server_problem(self.uri, error)]) from None
        user_experiment = os.environ.get("MLFLOW_EXPERIMENT_ID")
        mlflow.set_experiment(experiment_id=self.experiment_id)
        # ...and the experiment id too, which would point a later store at an experiment it may lack.
        if user_experiment is None:
            os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
        else:
            os.environ["MLFLOW_EXPERIMENT_ID"] = user_experiment

    def _ensure_experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            if EXPERIMENT_KIND[0] not in found.tags:  # made before raylm tagged its experiments, or by hand
                self.client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
            return found.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:///") and self.workspace.is_local:
            artifact_location = os.path.join(self.workspace.root, "mlartifacts", self.experiment_name)
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=artifact_location,
                                                 tags=dict([EXPERIMENT_KIND]))
        except mlflow.exceptions.MlflowException:  # created concurrently by another process
            return self.client.get_experiment_by_name(self.experiment_name).experiment_id

    @contextlib.contextmanager
    def run(self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
            nested: bool = False) -> Iterator[mlflow.ActiveRun]:
        with mlflow.start_run(run_name=name, nested=nested, tags={f"{TAG_PREFIX}code_version": code_version(),
                                                                   **(tags or {})}) as active:
            if params:
                self.log_params(params)
            yield active

    @contextlib.contextmanager
    def stage_run(self, stage: StageDir, section: dict[str, Any], reused: bool = False,
                  extra_params: dict[str, Any] | None = None) -> Iterator[mlflow.ActiveRun]:
        """A (nested, when a parent is active) run for one stage, with lineage tags."""
        tags = {
            f"{TAG_PREFIX}stage": stage.name,
            f"{TAG_PREFIX}fingerprint": stage.fingerprint,
            f"{TAG_PREFIX}output": stage.path(),  # the attempt folder that holds the files
            f"{TAG_PREFIX}config_hash": content_hash(section),
            f"{TAG_PREFIX}reused": str(reused).lower(),
        }
        for input_name, fingerprint in stage.inputs.items():
            tags[f"{TAG_PREFIX}input.{input_name}"] = fingerprint
        with self.run(stage.name, params={**flatten(section, f"{stage.name}."), **(extra_params or {})},
                      tags=tags, nested=mlflow.active_run() is not None) as active:
            yield active

    def open_stage_runs(self, stage: str, fingerprint: str) -> list[tuple[str, str]]:
        """(run id, attempt folder) of this stage's runs that MLflow still shows RUNNING (reuse runs aside)."""
        query = (f"tags.`{TAG_PREFIX}stage` = '{stage}' and tags.`{TAG_PREFIX}fingerprint` = '{fingerprint}' "
                 f"and tags.`{TAG_PREFIX}reused` = 'false' and attributes.status = 'RUNNING'")
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1000)
        return [(run.info.run_id, run.data.tags.get(f"{TAG_PREFIX}output", "")) for run in runs]

    def close_run(self, run_id: str, status: str, reason: str) -> None:
        """End a run another process left open, saying why (tag `raylm.closed_because`)."""
        self.client.set_tag(run_id, f"{TAG_PREFIX}closed_because", reason)
        self.client.set_terminated(run_id, status)

    @staticmethod
    def log_params(params: dict[str, Any]) -> None:
        clean = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:MAX_PARAM_LENGTH]
                 for k, v in params.items()}
        items = list(clean.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start:start + 100]))

    @staticmethod
    def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
        """Figures to the active run, each under its section for the run's stage (`metric_name`)."""
        stage = _run_stage(mlflow.active_run())
        numeric = {metric_name(k, stage): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    @staticmethod
    def log_manifest(manifest: dict[str, Any]) -> None:
        mlflow.log_dict(manifest, "manifest.json")


# The active run. Stage bodies and helpers log through these, never through `mlflow` itself, so MLflow's
# API is used in this file only. Each is a no-op outside a run (a benchmark or test calling a stage body).

MlflowException = mlflow.exceptions.MlflowException


def in_run() -> bool:
    """Whether an MLflow run is active."""
    return mlflow.active_run() is not None


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def start_run(run_id: str | None = None, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> str:
    """Start (or with `run_id`, reopen) a run, nested under the active one if there is one; its id."""
    nested = in_run()
    if run_id:
        return mlflow.start_run(run_id=run_id, nested=nested).info.run_id
    return mlflow.start_run(run_name=run_name, nested=nested, tags=tags).info.run_id


def end_run(status: str = "FINISHED") -> None:
    mlflow.end_run(status)


def set_tag(key: str, value: str) -> None:
    if in_run():
        mlflow.set_tag(key, value)


def set_tags(tags: dict[str, str]) -> None:
    if in_run():
        mlflow.set_tags(tags)


def log_dict(data: dict[str, Any], artifact_file: str) -> None:
    """A JSON (or YAML, by the file's extension) artifact."""
    if in_run():
        mlflow.log_dict(data, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    if in_run():
        mlflow.log_text(text, artifact_file)


def log_artifact(path: str, artifact_dir: str | None = None) -> None:
    """A local file as an artifact."""
    if in_run():
        mlflow.log_artifact(path, artifact_dir)


def log_figure(figure: Any, artifact_file: str) -> None:
    """A matplotlib figure as an image artifact."""
    if in_run():
        mlflow.log_figure(figure, artifact_file)


def log_table(columns: dict[str, list[Any]], artifact_file: str) -> None:
    """A table (column -> values) the MLflow UI shows in its artifact view."""
    if in_run():
        mlflow.log_table(data=columns, artifact_file=artifact_file)


def log_files(files: dict[str, str | bytes], artifact_dir: str) -> None:
    """In-memory files (name -> text or bytes) as artifacts under `artifact_dir`."""
    if not in_run():
        return
    with tempfile.TemporaryDirectory(prefix="raylm-artifacts-") as local:
        for name, content in files.items():
            path = os.path.join(local, name)
            if isinstance(content, bytes):
                with open(path, "wb") as handle:
                    handle.write(content)
            else:
                with open(path, "w", encoding="utf-8") as handle:
                    handle.write(content)
        mlflow.log_artifacts(local, artifact_dir)


def log_dataset(name: str, uri: str, digest: str, context: str, counts: dict[str, int] | None = None,
                columns: dict[str, str] | None = None) -> None:
    """The data a stage read, as an MLflow dataset input of the active run: its URI as the source, `digest`
    (the hash of the stage that wrote it), the `columns` (name -> MLflow type, `list<long>` for token ids)
    as its schema, and `counts` (rows, tokens, ...) as input tags."""
    if in_run():
        mlflow.log_input(dataset(name, uri, digest, columns), context=context,
                         tags={key: str(value) for key, value in (counts or {}).items()})


def dataset(name: str, uri: str, digest: str, columns: dict[str, str] | None = None):
    """An MLflow dataset (metadata only: nothing is read) for data at `uri`."""
    # deferred: MLflow's dataset modules load only when a stage logs its inputs
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    try:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local resolvers agree
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
    except mlflow.exceptions.MlflowException:  # hf://, gs:// and other schemes MLflow has no source for
        source = HTTPDatasetSource(uri)

    def column(column_name: str, kind: str) -> ColSpec:
        return ColSpec(Array(kind.removeprefix("list<").removesuffix(">")) if kind.startswith("list<") else kind,
                       column_name)

    schema = Schema([column(k, v) for k, v in columns.items()]) if columns else None
    return MetaDataset(source=source, name=name, digest=digest[:36], schema=schema)


# Models: logged models of the active run, the model registry.

def log_code_model(code_path: str, artifacts: dict[str, str], params: dict[str, int | float],
                   input_example: tuple[list[str], dict[str, Any]], pip_requirements: list[str], tags: dict[str, str],
                   artifact_name: str = "model") -> tuple[str, str]:
    """A pyfunc model built from the code in `code_path` (MLflow's models from code: nothing pickled), with
    `artifacts` (key -> local file) beside it, logged to the active run as an MLflow logged model. Its
    signature: one string column in, one string out, `params` (name -> default) as inference params.
    Returns (model URI, model id)."""
    # deferred: MLflow's model and schema modules load only when a model is logged
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    kinds = {int: "long", float: "double"}
    signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]),
                               params=ParamSchema([ParamSpec(name, kinds[type(default)], default)
                                                   for name, default in params.items()]))
    with warnings.catch_warnings():  # "add type hints to predict": the signature above is explicit
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(name=artifact_name, python_model=code_path, artifacts=artifacts,
                                       signature=signature, input_example=input_example,
                                       pip_requirements=pip_requirements, tags=tags)
    return info.model_uri, info.model_id


def log_transformers_pipeline(folder: str, tags: dict[str, str], artifact_name: str = "hf-model") -> str:
    """The `transformers` model folder `folder` as a text-generation pipeline logged with MLflow's transformers
    flavor (weights saved as safetensors), so `mlflow.transformers.load_model` gives a working pipeline.
    Its model URI."""
    # deferred: pulls in transformers, slow to import; only this path needs it
    import mlflow.transformers
    import transformers

    pipeline = transformers.pipeline("text-generation", model=transformers.AutoModelForCausalLM.from_pretrained(folder),
                                     tokenizer=transformers.AutoTokenizer.from_pretrained(folder))
    requirements = [f"transformers=={transformers.__version__}", f"torch=={_version('torch')}"]
    info = mlflow.transformers.log_model(transformers_model=pipeline, name=artifact_name, task="text-generation",
                                         pip_requirements=requirements, tags=tags)
    return info.model_uri


def _version(package: str) -> str:
    from importlib.metadata import version  # deferred: only logging a model reads package versions

    return version(package)


def register_model(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """A new version of registered model `name` (created if new) from `model_uri`; its number."""
    return str(mlflow.register_model(model_uri, name, tags=tags).version)


def model_version(client: MlflowClient, name: str, version: str | None = None, alias: str | None = None):
    """The ModelVersion `name`/`version` or `name`@`alias`, or None when there is none."""
    try:
        return client.get_model_version(name, version) if version is not None \
            else client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def log_model_metrics(metrics: dict[str, float], run_id: str, model_id: str, dataset: Any = None) -> None:
    """Metrics of run `run_id` linked to logged model `model_id` (and to the dataset they were measured on),
    under the names that run gives them (`metric_name`)."""
    stage = _run_stage(MlflowClient().get_run(run_id))
    mlflow.log_metrics({metric_name(k, stage): v for k, v in metrics.items()}, run_id=run_id, model_id=model_id,
                       dataset=dataset)


def log_run_metric(tracking_uri: str, run_id: str, key: str, value: float) -> None:
    """One figure to run `run_id` (not the active one), under its section for the run's stage."""
    runs = MlflowClient(tracking_uri)
    runs.log_metric(run_id, metric_name(key, _run_stage(runs.get_run(run_id))), value)


def latest_figures(runs: MlflowClient, run_id: str, keys: tuple[str, ...]) -> dict[str, float]:
    """The latest value of each raylm figure in `keys` that run `run_id` has logged, by raylm's names."""
    run = runs.get_run(run_id)
    stage = _run_stage(run)
    return {key: run.data.metrics[metric_name(key, stage)] for key in keys if metric_name(key, stage) in run.data.metrics}


# Runs by id, through a client (Ray workers, Tune trials, lookups of earlier runs).

def client(tracking_uri: str | None = None) -> MlflowClient:
    """A client of the store at `tracking_uri` (None: the one `Tracker` set for this process)."""
    return MlflowClient(tracking_uri)


def download_artifacts(artifact_uri: str) -> str:
    """A local copy of an MLflow artifact (`runs:/RUN_ID/path`), in a fresh temporary folder."""
    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tempfile.mkdtemp(prefix="raylm-"))


def download_run_artifact(run_id: str, artifact_path: str, tracking_uri: str) -> str:
    """A local copy of one artifact of a run in the store at `tracking_uri`."""
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, tracking_uri=tracking_uri,
                                               dst_path=tempfile.mkdtemp(prefix="raylm-"))


def child_run(client: MlflowClient, experiment_id: str, parent_run_id: str, key_tag: str, key: str, run_name: str,
              tags: dict[str, str], params: dict[str, Any]) -> str:
    """The nested run under `parent_run_id` tagged `key_tag = key`: reopened if it exists (a restored Tune
    sweep reruns a trial), else created with `tags` and `params`. Its id."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{key_tag}` = '{key}' and "
                                                            f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={"mlflow.parentRunId": parent_run_id, key_tag: key, **tags})
    clean = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000] for k, v in params.items()}
    items = list(clean.items())
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[start:start + 100]])
    return run.info.run_id


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list[Any]:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def metric_history(tracking_uri: str, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) of a run's figure `metric` (raylm's name) in time order; a step logged twice (a restart)
    keeps its last value."""
    runs = MlflowClient(tracking_uri)
    name = metric_name(metric, _run_stage(runs.get_run(run_id)))
    latest: dict[int, float] = {}
    for point in sorted(runs.get_metric_history(run_id, name), key=lambda m: m.timestamp):
        latest[point.step] = point.value
    return sorted(latest.items())


class RunLogger:
    """Metrics from inside Ray workers to an existing run (rank 0 of a trainer, say), batched."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 50):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.stage = _run_stage(self.client.get_run(run_id))
        self.flush_every = flush_every
        self._pending: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        stamp = timestamp_ms or int(time.time() * 1000)
        self._pending.extend(Metric(metric_name(k, self.stage), float(v), stamp, step)
                             for k, v in metrics.items() if v == v)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
        self._pending = []

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
from typing import Any, Iterator

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from raylm.config import ConfigError, TrackingConfig
from raylm.workspace import StageDir, Workspace, code_version, content_hash

TAG_PREFIX = "raylm."
MAX_PARAM_LENGTH = 6000


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


def ui_command(uri: str) -> str:
    """How to look at the runs: a server URL to open, or the `mlflow ui` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri} --port 5000"


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
            self.experiment_id = self._ensure_experiment()
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
            return found.experiment_id
        artifact_location = None
        if self.uri.startswith("sqlite:///") and self.workspace.is_local:
            artifact_location = os.path.join(self.workspace.root, "mlartifacts", self.experiment_name)
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=artifact_location)
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

    @staticmethod
    def log_params(params: dict[str, Any]) -> None:
        clean = {k: (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:MAX_PARAM_LENGTH]
                 for k, v in params.items()}
        items = list(clean.items())
        for start in range(0, len(items), 100):
            mlflow.log_params(dict(items[start:start + 100]))

    @staticmethod
    def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        if numeric:
            mlflow.log_metrics(numeric, step=step)

    @staticmethod
    def log_manifest(manifest: dict[str, Any]) -> None:
        mlflow.log_dict(manifest, "manifest.json")


class RunLogger:
    """Metrics from inside Ray workers to an existing run (rank 0 of a trainer, say), batched."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 50):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self._pending: list[Metric] = []

    def log(self, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        import time

        stamp = timestamp_ms or int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), stamp, step) for k, v in metrics.items() if v == v)
        if len(self._pending) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for start in range(0, len(self._pending), 1000):
            self.client.log_batch(self.run_id, metrics=self._pending[start:start + 1000])
        self._pending = []

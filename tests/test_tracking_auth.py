"""The MLflow server the cluster ships runs with authentication on: started here on loopback the way
cluster/kuberay/mlflow.yaml starts it (its ConfigMap's basic_auth.ini, the admin password from the
environment), a raylm command logs with the credentials the Ray pods get, and one without them, or
with a wrong password, stops before any work with one line naming tracking.uri."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml
from mlflow.tracking import MlflowClient

from raylm.cli import main
from tests.conftest import CONFIGS, REPO


def shipped_auth_config() -> str:
    docs = yaml.safe_load_all((REPO / "cluster" / "kuberay" / "mlflow.yaml").read_text())
    config_map = next(d for d in docs if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "mlflow-auth")
    return config_map["data"]["basic_auth.ini"]


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-auth")
    ini = shipped_auth_config().replace("sqlite:////mlflow/basic_auth.db", f"sqlite:///{folder}/basic_auth.db")
    (folder / "basic_auth.ini").write_text(ini)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    password = secrets.token_hex(16)
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(folder / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    mlflow_cli = os.path.join(os.path.dirname(sys.executable), "mlflow")
    server = subprocess.Popen([mlflow_cli, "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{folder}/mlflow.db"],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"),
                              start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-2000:]
            time.sleep(0.5)
    yield uri, password
    os.killpg(server.pid, 15)
    server.wait(timeout=30)


def plan_and_log(uri: str, monkeypatch) -> int:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return main(["plan", "--config", str(CONFIGS / "tiny.yaml"), "--gpu", "H100", "--gpus", "1", "--log"])


def test_a_command_without_credentials_is_one_line_naming_the_server(auth_server, monkeypatch, capsys):
    uri, _ = auth_server
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert plan_and_log(uri, monkeypatch) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-2:] == ["raylm: invalid configuration:",
                          f"  - tracking.uri = '{uri}': the MLflow server asks for credentials: set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (HTTP 401)"]
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "raylm")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    assert plan_and_log(uri, monkeypatch) == 2
    assert "rejected MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (HTTP 401)" in capsys.readouterr().err


def test_the_ray_pods_credentials_log_and_nobody_else_reads(auth_server, monkeypatch):
    uri, password = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "raylm")  # what raycluster.yaml gives every Ray container
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    assert plan_and_log(uri, monkeypatch) == 0
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("raylm").experiment_id])
    assert [run.info.run_name for run in runs] == ["plan"]
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    with pytest.raises(Exception, match="401"):
        MlflowClient(uri).search_experiments()


def test_a_checkpoint_registers_and_loads_through_the_server(auth_server, tmp_path, monkeypatch):
    """Issue 27 against a real `mlflow server`: the model's files go through the server's artifact proxy,
    `models:/` resolves through its registry, and the pyfunc loads back from it."""
    import mlflow
    import torch
    from test_model_hf import tokenizer_json

    from raylm import registry
    from raylm.config import TrackingConfig
    from raylm.model import TransformerConfig, build_model
    from raylm.tracking import Tracker
    from raylm.train.checkpoint import save_checkpoint
    from raylm.workspace import Workspace

    uri, password = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "raylm")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    config = TransformerConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, seq_len=32)
    model = build_model(config)
    checkpoint = str(tmp_path / "ckpt")
    save_checkpoint(checkpoint, model, torch.optim.AdamW(model.parameters()), {"step": 1}, config.to_dict(),
                    tokenizer_json(), rank=0)
    settings = TrackingConfig(uri=uri, experiment="served")
    tracker = Tracker(settings, Workspace(str(tmp_path / "ws")))
    with tracker.run("pretrain"):
        registered = registry.log_checkpoint_model(checkpoint, settings, "pretrain")
    assert registered.uri == "models:/served/1"
    assert registry.checkpoint_for("models:/served/1", uri)[0] == checkpoint
    with pytest.raises(registry.ModelReferenceError, match="registered versions of 'served': 1"):
        registry.checkpoint_for("models:/served/2", uri)
    mlflow.set_tracking_uri(uri)
    assert len(mlflow.pyfunc.load_model(registered.uri).predict(["def"], params={"max_new_tokens": 3})) == 1

"""`ray job submit` end to end, as on a real cluster: a Ray head started with `ray start --head` on
127.0.0.1 plus a second node, an `mlflow server` with a SQLite store, and jobs/pipeline.py submitted
with the README's command line. The job must succeed, and its runs and metrics must be in that MLflow
server; a job with a bad config must fail before any stage runs, with the config error in its logs.

Everything runs with its own ports, temp dir and Ray auth token (RAY_AUTH_TOKEN_PATH), in its own
process groups, and is stopped by those process ids at the end: other Ray instances on the machine
are never touched (no `ray stop`)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from raylm.runtime import LocalStorage, local_storage, storage_problems
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Background processes, each in its own session, stopped by process group id."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env, self.started = root, env, []

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                   cwd=self.root, start_new_session=True)
        process.log_path = self.root / f"{name}.log"
        self.started.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.started):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 15
        for process in reversed(self.started):
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            try:  # children that ignored SIGTERM (`ray start --block` waits on its raylet)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=10)


def wait_until(check, what: str, timeout: float, processes: list[subprocess.Popen]) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        for process in processes:
            if process.poll() is not None:
                tail = process.log_path.read_text()[-3000:]
                raise RuntimeError(f"{what}: {process.args[:3]} exited with {process.returncode}:\n{tail}")
        time.sleep(1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def retry(start, ready, attempts: int = 3) -> subprocess.Popen:
    for attempt in range(attempts):
        process = start(attempt)
        try:
            ready(process)
            return process
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            try:  # the group outlives a `ray start` that gave up: its gcs_server may still run
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=30)
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="rl10-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAYLM_WORKSPACE", "PYTHONPATH"):
        env.pop(name, None)
    gcs, dashboard, client, mlflow_port = free_port(), free_port(), free_port(), free_port()
    # Each node's dashboard agent serves job submission on its own port (Ray's default, 52365, is one
    # fixed port: a second cluster on the machine, or the second node here, would find it taken).
    head_agent, node_agent = free_port(), free_port()
    processes = Processes(root, env)
    try:
        server = processes.start("mlflow", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1",
            "--port", str(mlflow_port), "--workers", "1"])
        address = f"http://127.0.0.1:{dashboard}"

        def ray_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
            return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=env,
                                  cwd=REPO, timeout=timeout)

        def start_head(attempt: int) -> subprocess.Popen:
            return processes.start(f"ray-head-{attempt}", [
                str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(head_agent),
                "--num-cpus", "2", "--temp-dir", str(root / "ray"),
                "--disable-usage-stats"])

        # The second node gets its own temp dir, as a second machine has its own disk. Sharing the head's,
        # both nodes' runtime_env agents would unpack the job's working_dir into one folder: the second
        # agent's unpack (rmtree, then extract) deletes the folder the job driver runs in, and the driver
        # then dies importing torch (getcwd() fails: "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so").
        def start_node(attempt: int) -> subprocess.Popen:
            return processes.start(f"ray-node-{attempt}", [
                str(BIN / "ray"), "start", "--block", "--address", f"127.0.0.1:{gcs}", "--node-ip-address",
                "127.0.0.1", "--dashboard-agent-listen-port", str(node_agent), "--num-cpus", "1",
                "--temp-dir", str(root / "ray2"), "--disable-usage-stats"])

        def alive_nodes() -> int:
            listed = ray_cli("list", "nodes", "--address", address, "--format", "json")
            try:
                return sum(1 for n in json.loads(listed.stdout) if n.get("state") == "ALIVE")
            except ValueError:  # "No resource in the cluster" while the state API starts
                return 0

        # `ray start` gives a raylet 30 s to register, which an overloaded CI machine can miss: retry.
        head = retry(start_head, lambda p: wait_until(lambda: alive_nodes() >= 1, "ray head", 180, [p]))
        retry(start_node, lambda p: wait_until(lambda: alive_nodes() == 2, "second ray node", 180, [head, p]))
        tracking = f"http://127.0.0.1:{mlflow_port}"

        def mlflow_ready() -> bool:
            try:
                return urllib.request.urlopen(f"{tracking}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_until(mlflow_ready, "mlflow server", 120, [server])
        runtime_env = yaml.safe_load((REPO / "jobs" / "runtime_env.yaml").read_text())
        runtime_env["env_vars"].update({
            "RAYLM_WORKSPACE": str(root / "workspace"),  # on the disk both nodes share
            "MLFLOW_TRACKING_URI": tracking,
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        })
        (root / "runtime_env.yaml").write_text(yaml.safe_dump(runtime_env))
        yield {"root": root, "address": address, "tracking": tracking, "ray": ray_cli,
               "runtime_env": root / "runtime_env.yaml"}
    finally:
        processes.stop()
        leftovers = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True).stdout.split()
        assert not leftovers, f"processes still running from {root}: {leftovers}"
        shutil.rmtree(root, ignore_errors=True)


def submit(cluster, submission_id: str, *args: str) -> tuple[str, str]:
    """`ray job submit` as the README writes it; returns (final status, logs)."""
    for _ in range(20):  # the head's job agent can come up after the node is alive
        submitted = cluster["ray"]("job", "submit", "--address", cluster["address"], "--submission-id",
                                   submission_id, "--working-dir", ".", "--runtime-env", str(cluster["runtime_env"]),
                                   "--", "python", *args, timeout=1200)
        if "No available agent to submit job" not in submitted.stdout + submitted.stderr:
            break
        time.sleep(6)
    shown = cluster["ray"]("job", "status", "--address", cluster["address"], submission_id)
    logs = cluster["ray"]("job", "logs", "--address", cluster["address"], submission_id)
    return job_status(shown.stdout + shown.stderr, submission_id), submitted.stdout + submitted.stderr + logs.stdout + logs.stderr


def job_status(shown: str, submission_id: str) -> str:
    """`ray job status` output with the final status first, as a JobStatus name: Ray writes a finished job's
    status as "Job 'ID' succeeded" / "failed" / "was stopped", and any other as "Status for job 'ID': NAME"."""
    for words, name in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{submission_id}' {words}" in shown:
            return f"{name}\n{shown}"
    return shown


@pytest.mark.slow
def test_pipeline_job_on_a_two_node_cluster_and_an_s3_workspace_logs_to_the_mlflow_server(cluster, s3_bucket):
    """The README's `ray job submit` of the whole pipeline. Before any stage, every node writes, reads and
    deletes a probe object on the bucket (the S3 endpoint and credentials reach both nodes through their
    environment); each stage then commits there. (A workspace in a local folder both nodes see is checked
    the same way in tests/elastic_scenario.py, on its own 2-node cluster.)"""
    from mlflow.tracking import MlflowClient

    from raylm.workspace import Workspace

    workspace = f"{s3_bucket}/ws"
    status, logs = submit(cluster, "raylm-pipeline-tiny", "jobs/pipeline.py", "--config", "configs/tiny.yaml",
                          "--workspace", workspace)
    assert "SUCCEEDED" in status, status + logs[-3000:]
    assert f"{workspace} written, read and deleted from all 2 nodes" in logs
    assert "raylm pipeline finished" in logs
    client = MlflowClient(cluster["tracking"])
    experiment = client.get_experiment_by_name("raylm")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"curate", "tokenize", "pretrain", "eval", "report"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["eval"].data.metrics["val/bpb"] > 0
    assert children["curate"].data.metrics["data/rows_input"] > 0
    assert len(client.get_metric_history(children["pretrain"].info.run_id, "train/loss")) >= 3
    assert children["pretrain"].data.tags["raylm.checkpoint"].startswith(f"{workspace}/pretrain/")
    assert "manifest.json" in {a.path for a in client.list_artifacts(children["eval"].info.run_id)}
    report_files = {a.path for a in client.list_artifacts(children["report"].info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= report_files, report_files
    curated = Workspace(workspace).finished_runs("curate")[0].manifest()
    assert curated["counts"]["kept"] > 0 and curated["outputs"]["train"].startswith(f"{workspace}/curate/")


@pytest.mark.slow
def test_job_with_a_bad_config_fails_fast_with_the_error_in_its_logs(cluster):
    started = time.time()
    status, logs = submit(cluster, "raylm-bad-config", "jobs/pretrain.py", "--config", "configs/tiny.yaml",
                          "--set", "train.lr=-1", "--set", "train.workerz=2", "--workspace", "/tmp/rl10-never")
    assert "FAILED" in status, status + logs[-3000:]
    assert "train.lr = -1" in logs and "greater than 0" in logs
    assert "unknown key 'train.workerz'" in logs
    assert not os.path.exists("/tmp/rl10-never")  # refused before any stage, workspace or MLflow run
    print(f"bad-config job failed after {time.time() - started:.1f} s")


def test_local_storage_lists_what_nodes_must_share(tmp_path):
    found = local_storage(str(tmp_path / "ws"), f"sqlite:///{tmp_path}/ws/mlflow.db")
    assert [(s.key, s.folder) for s in found] == [("workspace.root", str(tmp_path / "ws")),
                                                  ("tracking.uri", str(tmp_path / "ws"))]
    assert local_storage("s3://bucket/raylm", "http://mlflow:5000") == []
    assert [s.key for s in local_storage("gs://bucket/raylm", "file:///mnt/mlruns")] == ["tracking.uri"]


def test_storage_not_seen_by_a_node_is_a_config_problem_naming_key_and_nodes():
    storage = [LocalStorage("workspace.root", "./raylm-workspace", "/job/raylm-workspace")]
    assert storage_problems(storage, {}) == []
    problems = storage_problems(storage, {"/job/raylm-workspace": ["10.0.0.7", "10.0.0.5"]})
    assert len(problems) == 1
    assert problems[0].startswith("workspace.root = './raylm-workspace'")
    assert "10.0.0.5, 10.0.0.7" in problems[0] and "s3://" in problems[0]

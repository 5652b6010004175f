"""Shared fixtures: one Ray instance for the whole test session, temporary workspaces, shared data.

Starting Ray once per session instead of once per test saves most of the suite's time. Ray Train's
controller polls workers every 2 s by default, which makes tiny runs slow; tests poll faster.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.s3_server import S3Server, free_port

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("RAYLM_WORKSPACE", None)
os.environ.pop("RAY_ADDRESS", None)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SHARED_DATA = Path(os.environ.get("RAYLM_SHARED_DATA", REPO.parent / "shared" / "data"))


# An S3 server on loopback (moto's server mode, started by the `s3_server` fixture when a test needs it).
# Its address and test credentials go into the environment now, before any Ray instance starts, so that
# Ray's workers, which inherit the environment, reach the same server as the driver. (conftest is
# imported twice, as `conftest` and as `tests.conftest`: both must name the same port.)
os.environ.setdefault("RAYLM_TEST_S3_ENDPOINT", f"http://127.0.0.1:{free_port()}")
S3_ENV = S3Server(os.environ["RAYLM_TEST_S3_ENDPOINT"]).env
os.environ.update(S3_ENV)


MLFLOW_ENV_AT_START = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


@pytest.fixture(autouse=True)
def isolated_mlflow_state():
    """Each test starts with MLflow's process-wide state as the session began: `mlflow.set_experiment`
    and `set_tracking_uri` export MLFLOW_EXPERIMENT_ID / MLFLOW_TRACKING_URI and keep an active
    experiment id, which would otherwise point a later test's fresh store at an experiment it lacks."""
    import mlflow
    import mlflow.tracking.fluent as fluent

    saved = MLFLOW_ENV_AT_START
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()
    fluent._active_experiment_id = None  # noqa: SLF001 (no public reset exists)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:
        if key not in saved:
            del os.environ[key]
    os.environ.update(saved)
    mlflow.set_tracking_uri(None)
    for key in [k for k in os.environ if k.startswith("MLFLOW_")]:  # set_tracking_uri exports it again
        if key not in saved:
            del os.environ[key]


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # the dashboard: CPU the suite needs
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_light():
    """The session's Ray when one is up; otherwise a local one without the dashboard (its agent is
    what fails to start in time on a saturated machine), shut down after this module."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture()
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared, busy machine two spinning
    threads per process make their tests several times slower. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def workspace_dir(tmp_path: Path) -> Path:
    path = tmp_path / "workspace"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent (set RAYLM_SHARED_DATA to its location)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """`moto_server` on 127.0.0.1 (the endpoint in S3_ENV) for the session; ended by its PID."""
    server = S3Server(S3_ENV["AWS_ENDPOINT_URL"], str(tmp_path_factory.mktemp("moto") / "moto.log"))
    try:
        server.start()
    except RuntimeError as error:
        pytest.fail(str(error))
    yield server
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the loopback S3 server: `s3://raylm-test-<id>`."""
    return s3_server.create_bucket()


def pytest_collection_finish(session):
    """Start the node-loss drill now when its test is selected (tests/background.py)."""
    from tests.background import ELASTIC_TEST, start_elastic_scenario

    if any(item.nodeid.startswith(ELASTIC_TEST) for item in session.items):
        start_elastic_scenario()


def pytest_sessionfinish(session, exitstatus):
    from tests.background import stop_all

    stop_all()

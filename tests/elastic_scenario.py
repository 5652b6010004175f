"""Node loss and recovery on a real 2-node Ray cluster (run as a script by test_train_elastic.py).

Two nodes with one CPU each, `train.workers = [1, 2]`. When the first checkpoint exists, the second
node is removed (its raylet killed); the run must continue on 1 worker from the last checkpoint. A
node is then added back and the run must grow to 2 workers again. Then a STOP file ends the run.
Prints one JSON line with every report the controller saw.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray  # noqa: E402
import ray.train  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from raylm.config import ClusterConfig  # noqa: E402
from raylm.runtime import check_shared_storage  # noqa: E402
from raylm.train.launch import STOP_FILE, build_trainer  # noqa: E402
from tests.train_helpers import make_packed, tiny_model, tiny_train  # noqa: E402


class RecordReports(ray.train.UserCallback):
    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as out:
            out.write(json.dumps({"step": metrics[0].get("step"), "workers": len(metrics),
                                  "checkpoint": checkpoint.path if checkpoint else None,
                                  "resumed_from_step": metrics[0].get("resumed_from_step"),
                                  "restarts": metrics[0].get("restarts"), "time": time.time()}) + "\n")


def reports(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def main() -> None:
    folder = Path(tempfile.mkdtemp(prefix="raylm-elastic-"))
    packed = make_packed(folder)
    log = folder / "reports.jsonl"
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5}})
    worker_node = cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    # A workspace in a local folder both nodes see (one machine): the check a stage makes before it runs
    storage_nodes = check_shared_storage(ClusterConfig(), str(folder / "ws"), f"sqlite:///{folder}/ws/mlflow.db")
    train = tiny_train(workers=(1, 2), max_steps=100_000, checkpoint_every=20, report_every=10, eval_every=100,
                       max_failures=3, elastic_resize_interval_s=2, deterministic=False)
    trainer = build_trainer(tiny_model(), train, packed, str(folder / "runs"), "elastic", "", None,
                            callbacks=[RecordReports(str(log))])
    events: dict[str, float] = {}
    failure: list[BaseException] = []

    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - reported below
            outcome["error"] = error

    training = threading.Thread(target=fit, daemon=True)
    training.start()
    try:  # the cluster is driven from the main thread (adding a node installs signal handlers)
        wait_for(lambda: any(r["checkpoint"] and r["workers"] == 2 for r in reports(log)), 400, "a 2-worker checkpoint")
        time.sleep(1.0)
        cluster.remove_node(worker_node, allow_graceful=False)
        events["node_removed"] = time.time()
        wait_for(lambda: any(r["workers"] == 1 and r["time"] > events["node_removed"] for r in reports(log)), 400,
                 "training on 1 worker")
        events["running_on_one"] = time.time()
        cluster.add_node(num_cpus=1)
        events["node_added"] = time.time()
        wait_for(lambda: any(r["workers"] == 2 and r["time"] > events["node_added"] for r in reports(log)), 400,
                 "training on 2 workers again")
        events["running_on_two"] = time.time()
    except BaseException as error:  # noqa: BLE001 - reported in the JSON line
        failure.append(error)
    finally:
        (folder / "runs" / "elastic" / STOP_FILE).write_text("stop\n")
    training.join(timeout=300)
    result = outcome.get("result")
    if result is None:
        failure.append(outcome.get("error", TimeoutError("fit did not return")))
    print("SCENARIO " + json.dumps({"error": repr(failure[0]) if failure else (repr(result.error) if result.error else None),
                                    "final_step": result.metrics.get("step") if result else None, "events": events,
                                    "reports": reports(log), "storage_nodes": storage_nodes}))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()

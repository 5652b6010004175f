"""Long drills that run in a process of their own, started when the session's tests are collected.

The node-loss scenario (tests/elastic_scenario.py) brings up its own 2-node cluster and spends most of its
1.5 minutes waiting: for checkpoints, for Ray to notice a dead node, for a new one to join. Started at
collection, it runs beside the first test modules; its test, late in the order, reads what it printed.
One module (not conftest, which pytest imports twice) holds the process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ELASTIC_TEST = "tests/test_train_elastic.py"
_running: dict[str, tuple[subprocess.Popen, Path]] = {}


def start_elastic_scenario() -> None:
    if "elastic" in _running:
        return
    folder = Path(tempfile.mkdtemp(prefix="raylm-elastic-run-"))
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        process = subprocess.Popen([sys.executable, str(REPO / "tests" / "elastic_scenario.py")], cwd=REPO,
                                   env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out, stderr=err)
    _running["elastic"] = (process, folder)


def elastic_scenario_result(timeout_s: float) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of the scenario, started now if collection did not start it."""
    start_elastic_scenario()
    process, folder = _running["elastic"]
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return process.returncode, (folder / "stdout").read_text(), (folder / "stderr").read_text()


def stop_all() -> None:
    """End whatever is still running (a session that stopped before a drill's test read it)."""
    for process, _ in _running.values():
        if process.poll() is None:
            process.kill()
            process.wait()

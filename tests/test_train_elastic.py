"""Issue test 5: node loss on a real 2-node Ray cluster (`ray.cluster_utils.Cluster`), elastic 1..2 workers.

The scenario runs in its own process (tests/elastic_scenario.py) because it needs its own Ray cluster
while the rest of the suite shares one local Ray instance. It kills the second node's raylet after the
first 2-worker checkpoint, waits for the run to continue on 1 worker from the last checkpoint, adds a
node back and waits for 2 workers again, then stops the run through its STOP file.
"""

from __future__ import annotations

import json

import pytest

from tests.background import elastic_scenario_result

pytestmark = pytest.mark.slow


def test_run_survives_node_loss_and_grows_back():
    returncode, stdout, stderr = elastic_scenario_result(timeout_s=1500)  # started at collection (tests/background.py)
    lines = [line for line in stdout.splitlines() if line.startswith("SCENARIO ")]
    assert lines, f"scenario printed no result (exit {returncode}):\n{stderr[-4000:]}"
    outcome = json.loads(lines[-1].removeprefix("SCENARIO "))
    assert outcome["error"] is None, outcome["error"]
    assert outcome["storage_nodes"] == 2  # the local workspace folder was seen from both nodes before training
    events, reports = outcome["events"], outcome["reports"]
    before = [r for r in reports if r["time"] < events["node_removed"]]
    # Between the kill and its detection Ray may restart once more on 2 workers (the dead node still
    # looks alive); from the first 1-worker report until the node comes back, every report is on 1.
    window = [r for r in reports if events["node_removed"] < r["time"] < events["node_added"]]
    first_on_one = next((i for i, r in enumerate(window) if r["workers"] == 1), len(window))
    on_one = window[first_on_one:]
    after = [r for r in reports if r["time"] > events["node_added"] and r["workers"] == 2]
    assert before and all(r["workers"] == 2 for r in before)
    assert on_one and all(r["workers"] == 1 for r in on_one)
    assert after, "the run did not grow back to 2 workers"
    last_checkpoint = max(r["step"] for r in before if r["checkpoint"])
    # continued on 1 worker from the last checkpoint saved before the node died (or a later one saved
    # while the failure was being detected), never from scratch
    assert on_one[0]["restarts"] >= 1 and on_one[0]["resumed_from_step"] >= last_checkpoint
    assert after[0]["restarts"] > on_one[0]["restarts"]
    assert after[0]["resumed_from_step"] >= max(r["step"] for r in on_one if r["checkpoint"])
    redone = max(r["step"] for r in before) - on_one[0]["resumed_from_step"]
    print(f"node loss: resumed at step {on_one[0]['resumed_from_step']} after reaching step "
          f"{max(r['step'] for r in before)}: {max(redone, 0)} steps redone (report granularity 10 steps); "
          f"{events['running_on_one'] - events['node_removed']:.0f} s to resume on 1 worker, "
          f"{events['running_on_two'] - events['node_added']:.0f} s to grow back to 2")
    assert outcome["final_step"] is not None and outcome["final_step"] >= after[0]["step"]

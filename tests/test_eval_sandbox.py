"""The HumanEval sandbox: refuses without consent, stops runaway programs, passes canonical solutions."""

from __future__ import annotations

import gzip
import json
import socket
import threading

import pytest

from raylm.eval import sandbox
from raylm.eval.sandbox import (CodeExecutionRefused, SandboxLimits, SandboxUnavailable, allow_code_execution,
                                allow_weak_isolation, estimate_pass_at_k, isolation_mode, pass_at_k, run_program)

LIMITS = SandboxLimits(timeout_s=3.0, memory_mb=512)


@pytest.fixture()
def allowed():
    allow_code_execution(True, LIMITS)
    yield
    allow_code_execution(False)


def test_refused_without_consent(monkeypatch):
    monkeypatch.delenv("RAYLM_ALLOW_CODE_EXECUTION", raising=False)
    allow_code_execution(False)
    with pytest.raises(CodeExecutionRefused, match="allow-code-execution"):
        run_program("print(1)")


@pytest.fixture()
def no_fence(monkeypatch):
    """This machine as one where the fence cannot be built (the probe's answer replaced)."""
    monkeypatch.setitem(sandbox._probe, "report", "error unshare(user, mount, pid, net, ipc, uts namespaces) failed: "
                                                  "Operation not permitted (errno 1)")
    monkeypatch.delenv("RAYLM_SANDBOX_ALLOW_WEAK", raising=False)
    yield
    allow_weak_isolation(False)


def test_refuses_without_the_fence_in_one_line(allowed, no_fence):
    with pytest.raises(SandboxUnavailable) as refused:
        run_program("print(1)")
    message = str(refused.value)
    assert "\n" not in message and "unshare" in message and "sandbox_allow_weak" in message
    with pytest.raises(SandboxUnavailable):
        isolation_mode()


def test_weak_mode_only_by_explicit_opt_in(allowed, no_fence, monkeypatch):
    allow_weak_isolation(True)
    result = run_program("import os\nprint(os.getcwd())\nopen('scratch.txt', 'w').write('fine')\n")
    assert result.passed and result.isolation == "weak" and "raylm-sandbox-" in result.output
    assert not run_program("import os\nos.system('true')\n").passed  # the Python guards still apply
    allow_weak_isolation(False)
    monkeypatch.setenv("RAYLM_SANDBOX_ALLOW_WEAK", "1")
    assert isolation_mode() == "weak"


def test_this_machine_has_the_fence():
    report = sandbox.isolation_report()
    if not report.startswith("ok"):
        pytest.skip(f"no OS fence on this machine: {report}")
    assert isolation_mode() in ("fence", "fence+landlock")
    assert "uid=" in report


def test_runs_plain_code_and_reports_failures(allowed):
    assert run_program("assert sum([1, 2]) == 3\nprint('ok')").passed
    failed = run_program("assert 1 == 2")
    assert not failed.passed and failed.status == "failed" and "AssertionError" in failed.output


def test_infinite_loop_is_stopped(allowed):
    result = run_program("while True:\n    pass\n")
    assert result.status == "timeout" and not result.passed


def test_fork_bomb_is_stopped(allowed):
    result = run_program("import os\nwhile True:\n    os.fork()\n")
    assert not result.passed and result.status == "failed"
    result = run_program("import subprocess\nsubprocess.Popen(['true'])\n")
    assert not result.passed


def test_memory_bomb_is_stopped(allowed):
    result = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(50_000_000))\n")
    assert not result.passed and "MemoryError" in result.output


def test_network_is_unreachable(allowed):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(2)
    port = server.getsockname()[1]
    connected = []

    def accept():
        try:
            connected.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    result = run_program(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                         f"s.sendall(b'hello')\n")
    thread.join()
    server.close()
    assert not result.passed and not connected
    raw = run_program(f"import _socket\ns = _socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n")
    if result.isolation.startswith("fence"):
        assert not raw.passed  # even below the Python guard, the namespace has no route out


def test_write_outside_folder_is_refused(allowed, tmp_path):
    target = tmp_path / "outside.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')\n")
    assert not result.passed and not target.exists()
    result = run_program(f"import os\nos.remove({str(tmp_path)!r})\n")
    assert not result.passed and tmp_path.exists()
    inside = run_program("open('scratch.txt', 'w').write('fine')\nassert open('scratch.txt').read() == 'fine'\n")
    assert inside.passed


def test_pass_at_k_estimator():
    assert estimate_pass_at_k(1, 1, 1) == 1.0
    assert estimate_pass_at_k(1, 0, 1) == 0.0
    assert estimate_pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert estimate_pass_at_k(5, 1, 2) == pytest.approx(1 - (4 * 3) / (5 * 4))


def _humaneval(shared_data):
    path = shared_data / "benchmarks" / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_canonical_solutions_pass_sample(allowed, shared_data):
    problems = _humaneval(shared_data)[:6]
    for problem in problems:
        reference = f"{problem['test']}\ncheck({problem['entry_point']})"
        assert pass_at_k([reference], [[problem["prompt"] + problem["canonical_solution"]]], k=[1]) == 1.0, problem["task_id"]
        assert pass_at_k([reference], [[problem["prompt"] + "    return None\n"]], k=[1]) == 0.0


@pytest.mark.slow
def test_all_canonical_solutions_pass(allowed, shared_data):
    from raylm.eval.sandbox import check_programs

    problems = _humaneval(shared_data)
    results = check_programs([f"{p['prompt']}{p['canonical_solution']}\n\n{p['test']}\ncheck({p['entry_point']})\n"
                              for p in problems])
    failed = [(p["task_id"], r.output[-300:]) for p, r in zip(problems, results) if not r.passed]
    assert not failed


@pytest.mark.slow
def test_programs_run_on_the_workers_holding_the_sandbox_resource():
    import ray

    from raylm.eval.sandbox import check_programs, run_on_ray_resource

    if ray.is_initialized():
        pytest.skip("needs its own Ray with a custom resource; one is already running in this process")
    ray.init(address="local", num_cpus=2, resources={"raylm_sandbox": 1}, include_dashboard=False,
             log_to_driver=False)
    try:
        allow_code_execution(True, LIMITS)
        run_on_ray_resource("raylm_sandbox")
        results = check_programs(["import os\nprint(os.getpid())\n", "assert False\n"])
        assert [r.passed for r in results] == [True, False]
        assert results[0].isolation.startswith("fence") and results[0].output.strip() == "1"
    finally:
        run_on_ray_resource(None)
        allow_code_execution(False)
        ray.shutdown()

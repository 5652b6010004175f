"""Running model-written code (HumanEval) behind an OS fence, and only when asked to.

Model-written code is treated as hostile: a checkpoint can come from anywhere. Each program runs in
`raylm/eval/fence.py`, a fresh launcher process that puts it in new user, mount, PID, network, IPC
and UTS namespaces, as an unprivileged uid (65534 when the caller is root), on a read-only view of
the filesystem with a private, size-capped tmpfs /tmp as its folder, a fresh /proc, no capabilities,
rlimits (CPU, memory, file size, processes), and Landlock where the kernel has it (reads only the
Python installation and system libraries, writes only its folder, no exec, no TCP, no signals out).
The Python guards of earlier versions stay inside as a second layer only. See fence.py for the steps.

No silent fallback: where the fence cannot be built (no unprivileged user namespaces, a seccomp or
AppArmor profile that forbids unshare or mount, a masked /proc), `isolation_mode()` raises
`SandboxUnavailable` with one line naming what failed, unless the user opted into the weaker mode
(`allow_weak_isolation(True)`: the `eval.sandbox_allow_weak` config key, `--sandbox-allow-weak`, or
`RAYLM_SANDBOX_ALLOW_WEAK=1`), where programs run with rlimits and Python guards only.

Nothing runs unless the user opts in: `allow_code_execution(True)` (the `eval.allow_code_execution`
config key, `--allow-code-execution` on the command line) or `RAYLM_ALLOW_CODE_EXECUTION=1`.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

FENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fence.py")
WEAK_FLAG = "eval.sandbox_allow_weak=true (--sandbox-allow-weak, RAYLM_SANDBOX_ALLOW_WEAK=1)"


class CodeExecutionRefused(PermissionError):
    """Model-written code was about to run without the user's consent."""


class SandboxUnavailable(RuntimeError):
    """The OS fence cannot be built here, and the user has not opted into the weaker mode."""


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    extra_processes: int = 4
    workers: int = 2
    folder_mb: int = 64          # the fenced program's private /tmp (tmpfs)
    folder_inodes: int = 4096


_state = {"allowed": False, "weak": False, "limits": SandboxLimits(), "ray_resource": None}


def allow_code_execution(allowed: bool, limits: SandboxLimits | None = None) -> None:
    _state["allowed"] = bool(allowed)
    if limits is not None:
        _state["limits"] = limits


def allow_weak_isolation(allowed: bool) -> None:
    """The user's explicit opt-in to rlimits and Python guards only where the OS fence is unavailable."""
    _state["weak"] = bool(allowed)


def run_on_ray_resource(name: str | None) -> None:
    """On a Ray cluster, probe and run programs in Ray tasks that need this custom resource, which only
    the worker group given what the fence needs advertises (cluster/kuberay: eval-workers); None: here."""
    _state["ray_resource"] = name or None


def _on_ray(function, *args):
    # deferred: pulls in ray, slow to import; only this path needs it
    import ray

    if not ray.is_initialized():
        raise SandboxUnavailable(f"HumanEval sandbox: eval.sandbox_ray_resource={_state['ray_resource']!r} is set "
                                 f"but Ray is not running here")
    task = ray.remote(num_cpus=1, resources={_state["ray_resource"]: 1}, max_retries=0)(function)
    return ray.get(task.remote(*args))


def _report_here() -> str:
    run_on_ray_resource(None)
    return isolation_report()


def _check_here(programs: list[str], limits: SandboxLimits, weak: bool) -> list[SandboxResult]:
    run_on_ray_resource(None)
    allow_code_execution(True, limits)  # the caller asked for consent before sending the programs
    allow_weak_isolation(weak)
    return check_programs(programs, limits)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") in ("1", "true", "yes")


def code_execution_allowed() -> bool:
    return bool(_state["allowed"]) or _env_flag("RAYLM_ALLOW_CODE_EXECUTION")


def weak_isolation_allowed() -> bool:
    return bool(_state["weak"]) or _env_flag("RAYLM_SANDBOX_ALLOW_WEAK")


def require_code_execution(what: str = "HumanEval") -> None:
    if not code_execution_allowed():
        raise CodeExecutionRefused(
            f"{what} runs model-written code; refusing without consent. Opt in with --allow-code-execution, "
            f"eval.allow_code_execution=true or RAYLM_ALLOW_CODE_EXECUTION=1 (the code runs in raylm's sandbox)")


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout
    returncode: int | None
    output: str
    isolation: str


def _user_process_count() -> int:
    uid = os.getuid()
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _launch(source: str, limits: SandboxLimits, mode: str) -> tuple[str, int | None, str, str]:
    """Run one program through fence.py; return (status, returncode, output, what fence.py reported)."""
    with tempfile.TemporaryDirectory(prefix="raylm-sandbox-") if mode == "weak" else _no_folder() as folder:
        # The fenced program's processes are counted in its own user namespace: it and the launcher.
        nproc = (_user_process_count() if mode == "weak" else 2) + limits.extra_processes
        status_r, status_w = os.pipe()
        settings = {"mode": mode, "status_fd": status_w, "memory_mb": limits.memory_mb,
                    "cpu_s": math.ceil(limits.timeout_s) + 1, "file_size_mb": limits.file_size_mb,
                    "nproc": nproc, "folder_mb": limits.folder_mb, "folder_inodes": limits.folder_inodes}
        deadline = time.monotonic() + limits.timeout_s
        status, output = "error", b""
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", FENCE, json.dumps(settings)], cwd=folder or "/",
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, pass_fds=(status_w,), start_new_session=True)
        finally:
            os.close(status_w)
        try:
            try:
                process.stdin.write(source.encode("utf-8"))
                process.stdin.close()
            except BrokenPipeError:
                pass
            process.stdin = None  # written and closed: communicate() only reads
            report = _read_report(status_r, deadline)
            if report is None:  # not even started within the time limit (a saturated machine)
                status, report = "timeout", "ok not started in time"
            elif report.startswith("ok"):
                try:
                    output, _ = process.communicate(timeout=max(0.0, deadline - time.monotonic()))
                    status = "passed" if process.returncode == 0 else "failed"
                except subprocess.TimeoutExpired:
                    status = "timeout"
        finally:
            os.close(status_r)
            try:  # the launcher's process group; the program's PID namespace dies with the launcher
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if status in ("timeout", "error"):
            output, _ = process.communicate()
        return status, process.returncode, output.decode("utf-8", "replace")[-4000:], report


class _no_folder:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _read_report(fd: int, deadline: float) -> str | None:
    """fence.py's one line: `ok LEVEL ...` just before the program starts, or `error WHAT FAILED`;
    None when the launcher has said nothing by the deadline."""
    data = b""
    while not data.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 4096) if ready else b""
        if not chunk:
            break
        data += chunk
    line = data.decode("utf-8", "replace").strip()
    if not ready and not line:
        return None
    return line or "error the sandbox launcher exited before reporting (see its output)"


_probe: dict[str, str] = {}


def isolation_report() -> str:
    """What the fence reports on this machine (probed once per process), e.g.
    `ok fence+landlock uid=65534 landlock_abi=7`, or `error <the step that failed>`; on the Ray
    workers that hold `run_on_ray_resource`'s resource where one is set."""
    if _state["ray_resource"]:
        key = f"ray:{_state['ray_resource']}"
        if key not in _probe:
            report = _on_ray(_report_here)
            where = f"on the Ray worker holding resource {_state['ray_resource']}"
            _probe[key] = report if report.startswith("ok") else f"error {where}: {report.removeprefix('error ')}"
        return _probe[key]
    if "report" not in _probe:
        if not sys.platform.startswith("linux"):
            _probe["report"] = f"error the fence needs Linux namespaces; this is {sys.platform}"
        else:
            status, _, output, report = _launch("pass\n", SandboxLimits(timeout_s=20.0), "fence")
            if report.startswith("ok") and status != "passed":
                report = f"error the fence's probe program failed: {output.strip()[-300:]}"
            _probe["report"] = report
    return _probe["report"]


def isolation_mode() -> str:
    """`fence+landlock` or `fence`; `weak` only where the fence is unavailable and the user opted in.
    Raises SandboxUnavailable (one line naming what is missing) otherwise."""
    report = isolation_report()
    if report.startswith("ok"):
        return report.split()[1]
    if weak_isolation_allowed():
        return "weak"
    raise SandboxUnavailable(f"HumanEval sandbox: no OS fence on this machine: {report.removeprefix('error ')}; "
                             f"to run with rlimits and Python guards only, opt in with {WEAK_FLAG}")


def isolation_summary() -> str:
    """One line for logs and summaries: the level used and what the probe found."""
    level = isolation_mode()
    detail = isolation_report()
    return f"{level} ({detail.removeprefix('ok ').removeprefix(level).strip() or detail})"


def run_program(source: str, limits: SandboxLimits | None = None, require_consent: bool = True) -> SandboxResult:
    """Run one Python program in the sandbox; passed means it exited with status 0 in time."""
    if require_consent:
        require_code_execution()
    limits = limits or _state["limits"]
    level = isolation_mode()
    status, returncode, output, report = _launch(source, limits, "weak" if level == "weak" else "fence")
    if status == "error":
        raise SandboxUnavailable(f"HumanEval sandbox: {report.removeprefix('error ')} {output.strip()[-300:]}".strip())
    return SandboxResult(status == "passed", status, returncode, output, level)


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of the HumanEval paper: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def check_programs(programs: list[str], limits: SandboxLimits | None = None) -> list[SandboxResult]:
    require_code_execution()
    limits = limits or _state["limits"]
    isolation_mode()  # refuse before starting any program
    if _state["ray_resource"]:
        return _on_ray(_check_here, programs, limits, weak_isolation_allowed())
    with ThreadPoolExecutor(max_workers=max(1, limits.workers)) as pool:
        return list(pool.map(lambda source: run_program(source, limits), programs))


# ---- lm-eval hooks (referenced by the generated humaneval task) ---------------------------------------

def build_predictions(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval's humaneval filter: the prompt followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int | None = None) -> float:
    """One document's pass@k (the smallest k given): its candidates run against its tests in the sandbox."""
    ks = [k] if isinstance(k, int) else list(k or [1])
    (reference,), (candidates,) = references, predictions
    results = check_programs([f"{candidate}\n\n{reference}\n" for candidate in candidates])
    passed = sum(r.passed for r in results)
    return estimate_pass_at_k(len(candidates), passed, min(ks))

"""Running model-written code (HumanEval) in a separate, limited process, and only when asked to.

Each program runs in a fresh Python process (`python -I`, an empty environment) in a new session,
with its working directory, HOME and TMPDIR set to a new temporary folder, and these limits:

- time: a wall-clock limit (the whole process group is killed) and an RLIMIT_CPU backstop;
- memory: RLIMIT_AS (address space), so a memory bomb gets MemoryError instead of the machine;
- processes: a new user namespace makes RLIMIT_NPROC apply (even to root); the limit is the number of
  processes this user already has plus a few, and `os.fork`/`subprocess`/`exec*` are disabled inside;
- network: a new network namespace (no interfaces but a downed loopback), and `socket` disabled inside;
- files: RLIMIT_FSIZE, and every write, create, rename or delete outside the temporary folder refused.

The namespaces are an OS-level fence where the kernel allows unprivileged user namespaces (it falls
back to the in-process guards where it does not; `SandboxResult.isolation` says which applied). The
in-process guards stop honest mistakes of model-written code, not a determined attacker: run
untrusted code on a machine you can lose.

Nothing runs unless the user opts in: `allow_code_execution(True)` (the `eval.allow_code_execution`
config key, `--allow-code-execution` on the command line) or `RAYLM_ALLOW_CODE_EXECUTION=1`.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000


class CodeExecutionRefused(PermissionError):
    """Model-written code was about to run without the user's consent."""


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0
    memory_mb: int = 1024
    file_size_mb: int = 16
    extra_processes: int = 4
    workers: int = 2


_state = {"allowed": False, "limits": SandboxLimits()}


def allow_code_execution(allowed: bool, limits: SandboxLimits | None = None) -> None:
    _state["allowed"] = bool(allowed)
    if limits is not None:
        _state["limits"] = limits


def code_execution_allowed() -> bool:
    return bool(_state["allowed"]) or os.environ.get("RAYLM_ALLOW_CODE_EXECUTION", "") in ("1", "true", "yes")


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


# The guard runs inside the child before the program: it limits what Python-level code can reach.
GUARD = textwrap.dedent('''
    import builtins, io, os, shutil, socket, subprocess, sys
    ROOT = os.path.realpath(sys.argv[1])
    PROGRAM = sys.argv[2]

    def _inside(path):
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.path.join(ROOT, os.fsdecode(os.fspath(path))))
        return full == ROOT or full.startswith(ROOT + os.sep)

    def _refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    _open = builtins.open
    def _guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not _inside(file):
            _refuse(f"writing {file}")
        return _open(file, mode, *args, **kwargs)
    builtins.open = io.open = _guarded_open

    _os_open = os.open
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _guarded_os_open(path, flags, *args, **kwargs):
        if flags & _WRITE and not _inside(path):
            _refuse(f"writing {path}")
        return _os_open(path, flags, *args, **kwargs)
    os.open = _guarded_os_open

    def _paths_inside(name, fn):
        def wrapper(*args, **kwargs):
            for arg in list(args[:2]) + [kwargs.get("src"), kwargs.get("dst")]:
                if isinstance(arg, (str, bytes, os.PathLike)) and not _inside(arg):
                    _refuse(f"{name}({arg})")
            return fn(*args, **kwargs)
        return wrapper
    for _name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir", "makedirs",
                  "chmod", "chown", "lchown", "link", "symlink", "truncate", "utime", "mkfifo", "mknod"):
        if hasattr(os, _name):
            setattr(os, _name, _paths_inside(_name, getattr(os, _name)))
    for _name in ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "chown"):
        setattr(shutil, _name, _paths_inside(_name, getattr(shutil, _name)))

    def _disabled(what):
        def refuse(*args, **kwargs):
            _refuse(what)
        return refuse
    for _name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                  "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
                  "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setuid", "setgid", "chroot",
                  "putenv", "unsetenv"):
        if hasattr(os, _name):
            setattr(os, _name, _disabled(f"os.{_name}"))
    subprocess.Popen = _disabled("subprocess")
    socket.socket = _disabled("network access")
    socket.create_connection = _disabled("network access")
    socket.socketpair = _disabled("network access")
    sys.modules["ctypes"] = None
    sys.modules["_ctypes"] = None

    del _name
    with _open(PROGRAM, encoding="utf-8") as _handle:
        _source = _handle.read()
    exec(compile(_source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": builtins})
''')


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


def _namespaces_available() -> bool:
    """Whether this machine lets a process enter new user and network namespaces (checked in a child)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        probe = subprocess.run([sys.executable, "-I", "-c",
                                "import ctypes,sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare("
                                f"{CLONE_NEWUSER | CLONE_NEWNET}))"], timeout=20, capture_output=True)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


_namespaces: dict[str, bool] = {}


def isolation_mode() -> str:
    if "ok" not in _namespaces:
        _namespaces["ok"] = _namespaces_available()
    return "namespaces+rlimits+guards" if _namespaces["ok"] else "rlimits+guards"


def _limit_child(limits: SandboxLimits, nproc: int, namespaces: bool):
    libc = ctypes.CDLL(None, use_errno=True) if namespaces else None

    def apply() -> None:  # runs in the child between fork and exec
        if libc is not None and libc.unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            os._exit(97)
        memory = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = int(math.ceil(limits.timeout_s)) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        size = limits.file_size_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_program(source: str, limits: SandboxLimits | None = None, require_consent: bool = True) -> SandboxResult:
    """Run one Python program in the sandbox; passed means it exited with status 0 in time."""
    if require_consent:
        require_code_execution()
    limits = limits or _state["limits"]
    mode = isolation_mode()
    namespaces = mode.startswith("namespaces")
    with tempfile.TemporaryDirectory(prefix="raylm-sandbox-") as folder:
        with open(os.path.join(folder, "program.py"), "w", encoding="utf-8") as handle:
            handle.write(source)
        guard = os.path.join(folder, ".guard.py")
        with open(guard, "w", encoding="utf-8") as handle:
            handle.write(GUARD)
        env = {"HOME": folder, "TMPDIR": folder, "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "LANG": "C.UTF-8"}
        process = subprocess.Popen(
            [sys.executable, "-I", guard, folder, os.path.join(folder, "program.py")], cwd=folder, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_limit_child(limits, _user_process_count() + limits.extra_processes, namespaces))
        try:
            output, _ = process.communicate(timeout=limits.timeout_s)
            status = "passed" if process.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            status = "timeout"
            output = b""
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if process.poll() is None or status == "timeout":
                extra, _ = process.communicate()
                output = (output or b"") + (extra or b"")
    return SandboxResult(status == "passed", status, process.returncode, output.decode("utf-8", "replace")[-4000:], mode)


def estimate_pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of the HumanEval paper: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def check_programs(programs: list[str], limits: SandboxLimits | None = None) -> list[SandboxResult]:
    require_code_execution()
    limits = limits or _state["limits"]
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

"""Hostile programs against the HumanEval sandbox's OS fence, by category, several ways each.

Each program is written to succeed at its attack (it goes under the Python guards: raw `posix`,
`_io`, `_socket`, restored builtins, re-imported modules, ctypes) and the test checks that nothing
outside the program's folder changed: files and folders the test made outside (one under /tmp,
which the sandbox replaces with its own tmpfs, one under /var/tmp, which it sees read-only), a 0600
secret, the caller's home, a fake workspace with the checkpoint under evaluation, a listener on
127.0.0.1, processes the test started. Everything the tests touch is in temporary folders they create.
The whole module is skipped, with the reason, where the OS fence cannot be built.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from raylm.eval import sandbox
from raylm.eval.sandbox import SandboxLimits, allow_code_execution, isolation_report, run_program

LIMITS = SandboxLimits(timeout_s=5.0, memory_mb=512, file_size_mb=4, folder_mb=16, folder_inodes=512)
SECRET = "raylm-h28-secret-7f3a9c"

if not isolation_report().startswith("ok"):
    pytest.skip(f"no OS fence on this machine: {isolation_report()}", allow_module_level=True)


@pytest.fixture(autouse=True)
def allowed():
    allow_code_execution(True, LIMITS)
    yield
    allow_code_execution(False)


def run(source: str, **values) -> sandbox.SandboxResult:
    program = textwrap.dedent(source).replace("'ESCAPED'", "'ESC' 'APED'")  # tracebacks quote the source
    for name, value in values.items():
        program = program.replace(name, repr(str(value)))
    return run_program(program, LIMITS)


@pytest.fixture(params=["tmp", "var_tmp"])
def outside(request, tmp_path) -> Path:
    """A folder outside the sandbox, with a 0600 secret, a public file, and a fake workspace holding the
    checkpoint under evaluation; under /tmp (hidden by the sandbox's own /tmp) or /var/tmp (visible)."""
    if request.param == "tmp":
        folder = tmp_path / "outside"
        folder.mkdir()
    else:
        if not os.access("/var/tmp", os.W_OK):
            pytest.skip("/var/tmp is not writable here")
        folder = Path(tempfile.mkdtemp(prefix="raylm-h28-test-", dir="/var/tmp"))
    folder.chmod(0o755)
    (folder / "secret.txt").write_text(SECRET)
    (folder / "secret.txt").chmod(0o600)
    (folder / "public.txt").write_text("public")
    checkpoint = folder / "workspace" / "pretrain" / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.safetensors").write_bytes(b"\x00weights" * 64)
    (checkpoint / "config.json").write_text('{"d_model": 8}')
    for path in (folder / "workspace", folder / "workspace" / "pretrain", checkpoint):
        path.chmod(0o777)  # even world-writable: only the fence keeps them intact
    yield folder
    if request.param == "var_tmp":
        shutil.rmtree(folder)


def snapshot(folder: Path) -> dict[str, tuple]:
    state = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else None
        state[str(path.relative_to(folder))] = (stat.S_IMODE(info.st_mode), info.st_uid, info.st_mtime_ns, content)
    return state


def assert_untouched(folder: Path, before: dict, result: sandbox.SandboxResult) -> None:
    assert snapshot(folder) == before, result.output
    assert SECRET not in result.output
    assert "ESCAPED" not in result.output, result.output


# ---- raw posix / _io / _socket -----------------------------------------------------------------------

RAW_WRITES = {
    "posix.open": """
        import posix
        fd = posix.open(TARGET, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC, 0o666)
        posix.write(fd, b'pwned'); posix.close(fd); print('ESCAPED')
    """,
    "_io.FileIO": """
        import _io
        _io.FileIO(TARGET, 'w').write(b'pwned'); print('ESCAPED')
    """,
    "_io.open append": """
        import _io
        with _io.open(PUBLIC, 'a') as f: f.write('pwned')
        print('ESCAPED')
    """,
    "posix.rename and unlink": """
        import posix
        try:
            posix.rename(PUBLIC, TARGET)
        finally:
            posix.unlink(PUBLIC)
        print('ESCAPED')
    """,
    "posix.chmod, utime, mkdir": """
        import posix
        for attempt in (lambda: posix.chmod(PUBLIC, 0o777), lambda: posix.utime(PUBLIC, (0, 0)),
                        lambda: posix.mkdir(TARGET)):
            try:
                attempt(); print('ESCAPED')
            except OSError as error:
                print('refused', error)
    """,
    "posix.symlink into the folder, then write through it": """
        import posix
        posix.symlink(PUBLIC, 'link')
        with open('link', 'a') as f: f.write('pwned')
        print('ESCAPED')
    """,
}


@pytest.mark.parametrize("way", sorted(RAW_WRITES))
def test_raw_module_writes_have_no_effect(outside, way):
    before = snapshot(outside)
    result = run(RAW_WRITES[way], TARGET=outside / "created.txt", PUBLIC=outside / "public.txt")
    assert_untouched(outside, before, result)


# ---- restoring the patched builtins ------------------------------------------------------------------

RESTORES = {
    "the real open from the guard's closure": """
        import builtins
        real = next(c.cell_contents for c in builtins.open.__closure__ if callable(c.cell_contents)
                    and getattr(c.cell_contents, '__name__', '') == 'open')
        real(TARGET, 'w').write('pwned'); print('ESCAPED')
    """,
    "io re-imported from scratch": """
        import sys
        del sys.modules['io']
        import io
        io.open(TARGET, 'w').write('pwned'); print('ESCAPED')
    """,
    "_io.open put back into builtins": """
        import builtins, _io
        builtins.open = _io.open
        open(TARGET, 'w').write('pwned'); print('ESCAPED')
    """,
    "os re-imported and os.system": """
        import sys, importlib
        for name in ('os', 'posixpath', 'subprocess'):
            sys.modules.pop(name, None)
        import os
        os.system('echo pwned > ' + TARGET)
        print('ESCAPED' if os.path.exists(TARGET) else 'no effect')
    """,
    "ctypes re-enabled, libc's open": """
        import sys
        sys.modules.pop('ctypes', None); sys.modules.pop('_ctypes', None)
        import ctypes
        libc = ctypes.CDLL(None)
        fd = libc.open(TARGET.encode(), 0o1 | 0o100, 0o666)
        assert fd >= 0, ctypes.get_errno()
        libc.write(fd, b'pwned', 5); print('ESCAPED')
    """,
}


@pytest.mark.parametrize("way", sorted(RESTORES))
def test_restored_builtins_have_no_effect(outside, way):
    before = snapshot(outside)
    result = run(RESTORES[way], TARGET=outside / "created.txt")
    assert_untouched(outside, before, result)


# ---- undoing the fence from inside --------------------------------------------------------------------

_LIBC = """
        import sys
        sys.modules.pop('ctypes', None); sys.modules.pop('_ctypes', None)
        import ctypes, posix
        libc = ctypes.CDLL(None, use_errno=True)
        def write_target():
            fd = posix.open(TARGET, posix.O_WRONLY | posix.O_CREAT, 0o666)
            posix.write(fd, b'pwned'); print('ESCAPED')
"""
UNDOS = {
    "unmount the private /tmp": _LIBC + """
        print(libc.umount2(b'/tmp', 2), ctypes.get_errno())
        write_target()
    """,
    "remount / read-write": _LIBC + """
        print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())
        write_target()
    """,
    "mount_setattr clearing read-only": _LIBC + """
        attr = (ctypes.c_uint64 * 4)(0, 1, 0, 0)
        print(libc.syscall(442, -100, b'/', 0x8000, ctypes.byref(attr), 32), ctypes.get_errno())
        write_target()
    """,
    "a nested user and mount namespace, then remount read-write": _LIBC + """
        print(libc.unshare(0x10000000 | 0x00020000), ctypes.get_errno())
        print(libc.mount(None, b'/', None, 32 | 4096, None), ctypes.get_errno())
        print(libc.umount2(b'/tmp', 2), ctypes.get_errno())
        write_target()
    """,
    "setuid 0 and setgroups": _LIBC + """
        print(libc.setresuid(0, 0, 0), libc.setresgid(0, 0, 0), libc.setgroups(0, None), ctypes.get_errno())
        write_target()
    """,
}


@pytest.mark.parametrize("way", sorted(UNDOS))
def test_undoing_the_fence_has_no_effect(outside, way):
    before = snapshot(outside)
    result = run(UNDOS[way], TARGET=outside / "created.txt")
    assert not result.passed
    assert_untouched(outside, before, result)


# ---- shell, fork, exec -------------------------------------------------------------------------------

SHELLS = {
    "posix.system": "import posix\nposix.system('touch ' + TARGET + '; cat ' + SECRET_FILE)\n",
    "posix.fork + execv /bin/sh": """
        import posix
        pid = posix.fork()
        if pid == 0:
            posix.execv('/bin/sh', ['sh', '-c', 'touch ' + TARGET + '; cat ' + SECRET_FILE])
        print(posix.waitpid(pid, 0))
    """,
    "posix.posix_spawn": """
        import posix
        pid = posix.posix_spawn('/bin/sh', ['sh', '-c', 'touch ' + TARGET], {})
        print(posix.waitpid(pid, 0))
    """,
    "_posixsubprocess.fork_exec via a restored subprocess": """
        import sys
        sys.modules.pop('subprocess', None)
        import importlib, subprocess
        importlib.reload(subprocess)
        print(subprocess.run(['/bin/sh', '-c', 'touch ' + TARGET + '; cat ' + SECRET_FILE], capture_output=True))
    """,
    "python itself, exec'd with -c": """
        import posix, sys
        posix.execv(sys.executable, [sys.executable, '-c', 'open(' + repr(TARGET) + ', "w").write("x")'])
    """,
}


@pytest.mark.parametrize("way", sorted(SHELLS))
def test_shell_fork_exec_have_no_effect(outside, way):
    before = snapshot(outside)
    result = run(SHELLS[way], TARGET=outside / "created.txt", SECRET_FILE=outside / "secret.txt")
    assert_untouched(outside, before, result)


def test_exec_is_refused_even_inside_the_folder():
    result = run("""
        import posix
        with open('script', 'w') as f:
            f.write('#!/bin/sh\\nexit 0\\n')
        posix.chmod('script', 0o755)
        posix.execv('./script', ['script'])
    """)
    assert not result.passed and "Permission denied" in result.output


# ---- reading a 0600 file and the caller's home -------------------------------------------------------

READS = {
    "open": "print(open(SECRET_FILE).read())\n",
    "posix.open + read": "import posix\nprint(posix.read(posix.open(SECRET_FILE, posix.O_RDONLY), 100))\n",
    "_io.FileIO": "import _io\nprint(_io.FileIO(SECRET_FILE).read())\n",
    "copy into the folder, then read": """
        import shutil
        shutil.copyfile(SECRET_FILE, 'copy.txt')
        print(open('copy.txt').read())
    """,
    "through /proc/1/root": "print(open('/proc/1/root' + SECRET_FILE).read())\n",
}


@pytest.mark.parametrize("way", sorted(READS))
def test_secret_file_is_not_read(outside, way):
    before = snapshot(outside)
    result = run(READS[way], SECRET_FILE=outside / "secret.txt")
    assert not result.passed
    assert_untouched(outside, before, result)


def test_callers_home_is_not_read():
    home = Path(os.path.expanduser("~"))
    files = sorted(p for p in home.iterdir() if p.is_file() and p.stat().st_size > 16) if home.is_dir() else []
    if not files:
        pytest.skip(f"the caller's home {home} has no file to try")
    if os.getuid() != 0 and "landlock" not in sandbox.isolation_mode():
        pytest.skip("without Landlock a non-root caller's own files stay readable (README: threat model)")
    target = files[0]
    listing = run("import posix\nprint('ESCAPED', posix.listdir(HOME))\n", HOME=home)
    content = run("print('ESCAPED', open(TARGET).read())\n", TARGET=target)
    assert "ESCAPED" not in listing.output and "ESCAPED" not in content.output
    assert target.read_text(errors="replace")[:64] not in content.output


# ---- writing the workspace and the checkpoint under evaluation --------------------------------------

CHECKPOINT_WRITES = {
    "truncate the weights": "import posix\nposix.truncate(WEIGHTS, 0)\nprint('ESCAPED')\n",
    "overwrite the config": """
        import posix
        fd = posix.open(CONFIG, posix.O_WRONLY | posix.O_TRUNC)
        posix.write(fd, b'{"d_model": 1}'); print('ESCAPED')
    """,
    "replace the checkpoint folder": """
        import posix
        posix.rename(CHECKPOINT, CHECKPOINT + '.old'); posix.mkdir(CHECKPOINT); print('ESCAPED')
    """,
    "delete the weights": "import posix\nposix.unlink(WEIGHTS)\nprint('ESCAPED')\n",
    "a new file in the workspace": """
        import _io
        _io.open(WORKSPACE + '/metrics.json', 'w').write('{"pass@1": 1.0}'); print('ESCAPED')
    """,
    "hard link the weights into the folder, then write": """
        import posix
        posix.link(WEIGHTS, 'weights')
        with open('weights', 'r+b') as f: f.write(b'pwned')
        print('ESCAPED')
    """,
}


@pytest.mark.parametrize("way", sorted(CHECKPOINT_WRITES))
def test_workspace_and_checkpoint_are_untouched(outside, way):
    workspace = outside / "workspace"
    checkpoint = workspace / "pretrain" / "checkpoint"
    before = snapshot(outside)
    result = run(CHECKPOINT_WRITES[way], WORKSPACE=workspace, CHECKPOINT=checkpoint,
                 WEIGHTS=checkpoint / "model.safetensors", CONFIG=checkpoint / "config.json")
    assert not result.passed
    assert_untouched(outside, before, result)


# ---- a loopback connection to a listener the test opens ----------------------------------------------

CONNECTS = {
    "_socket": """
        import _socket
        s = _socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', PORT)); s.send(b'hello'); print('ESCAPED')
    """,
    "socket re-imported": """
        import sys
        sys.modules.pop('socket', None)
        import socket
        socket.create_connection(('127.0.0.1', PORT), timeout=2).sendall(b'hello'); print('ESCAPED')
    """,
    "loopback brought up first": """
        import sys, _socket
        sys.modules.pop('ctypes', None); sys.modules.pop('_ctypes', None)
        import ctypes, fcntl, struct
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        fcntl.ioctl(s.fileno(), 0x8914, struct.pack('16sH14s', b'lo', 0x1 | 0x40, b''))
        c = _socket.socket(); c.settimeout(2); c.connect(('127.0.0.1', PORT)); c.send(b'hello'); print('ESCAPED')
    """,
    "UDP datagram": """
        import _socket
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        s.sendto(b'hello', ('127.0.0.1', UDP_PORT)); print('sent')
    """,
    "abstract Unix socket": """
        import _socket
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(2); s.connect(ABSTRACT.encode().replace(b'@', b'\\0', 1)); s.send(b'hello'); print('ESCAPED')
    """,
}


@pytest.mark.parametrize("way", sorted(CONNECTS))
def test_loopback_listener_gets_nothing(way):
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(4)
    tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    abstract = f"@raylm-h28-test-{os.getpid()}-{time.monotonic_ns()}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + abstract[1:])
    unix.listen(4)
    unix.settimeout(0.2)
    received, stop = [], threading.Event()

    def listen():
        while not stop.is_set():
            for server in (tcp, unix):
                try:
                    received.append(server.accept())
                except OSError:
                    pass
            try:
                received.append(udp.recvfrom(100))
            except OSError:
                pass
    thread = threading.Thread(target=listen)
    thread.start()
    try:
        program = CONNECTS[way].replace("UDP_PORT", str(udp.getsockname()[1])).replace("PORT", str(tcp.getsockname()[1]))
        result = run(program, ABSTRACT=abstract)
    finally:
        stop.set()
        thread.join()
        for server in (tcp, udp, unix):
            server.close()
    assert not received, result.output
    assert "ESCAPED" not in result.output


# ---- signals to the parent and other processes -------------------------------------------------------

def test_signals_reach_no_outside_process(tmp_path):
    flag = tmp_path / "victim-signalled"
    victim = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import signal, time
        def note(number, frame):
            open({str(flag)!r}, 'a').write(str(number) + '\\n')
        for number in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, note)
        time.sleep(60)
    """)])
    try:
        time.sleep(0.3)
        ways = [
            "import posix, signal\nposix.kill(VICTIM, signal.SIGUSR1)\nprint('ESCAPED')\n",
            "import posix, signal\nposix.killpg(posix.getpgid(VICTIM), signal.SIGTERM)\nprint('ESCAPED')\n",
            "import posix\nposix.kill(CALLER, 0)\nprint('ESCAPED')\n",
            "import posix\nposix.kill(posix.getppid(), 0) if posix.getppid() else None\nprint('parent is', posix.getppid())\n",
            "import posix\nposix.kill(-1, 0)\nprint('ESCAPED')\n",
            "import posix\nprint('ESCAPED' if [p for p in posix.listdir('/proc') if p.isdigit() and p != '1'] else 'alone')\n",
        ]
        for way in ways:
            result = run(way, VICTIM=victim.pid, CALLER=os.getpid())
            result.output = result.output.replace(f"'{victim.pid}'", "")
            assert "ESCAPED" not in result.output, (way, result.output)
        assert "parent is 0" in run(ways[3]).output  # the launcher is outside the PID namespace
        time.sleep(0.3)
        assert victim.poll() is None and not flag.exists()
    finally:
        victim.kill()
        victim.wait()


# ---- fork bombs, memory bombs, filling the disk ------------------------------------------------------

def _fence_processes() -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and sandbox.FENCE.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
        except OSError:
            continue
    return found


FORK_BOMBS = {
    "posix.fork loop": "import posix, time\nwhile True:\n    posix.fork()\n",
    "forks that sleep, detached": """
        import posix, time
        while True:
            if posix.fork() == 0:
                posix.setsid(); time.sleep(120); posix._exit(0)
    """,
    "threads": "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(120,)).start()\n",
}


@pytest.mark.parametrize("way", sorted(FORK_BOMBS))
def test_fork_bombs_end_with_the_program(way):
    started = time.monotonic()
    result = run(FORK_BOMBS[way])
    assert not result.passed
    assert time.monotonic() - started < LIMITS.timeout_s + 5
    time.sleep(0.2)
    assert not _fence_processes()


MEMORY_BOMBS = {
    "bytearrays": "b = []\nwhile True:\n    b.append(bytearray(50_000_000))\n",
    "one huge bytes": "x = b'x' * (1 << 34)\n",
    "anonymous mmap": "import mmap\nm = mmap.mmap(-1, 1 << 34)\nm[::4096] = b'x' * ((1 << 34) // 4096)\n",
    "in forked children": """
        import posix
        for _ in range(3):
            if posix.fork() == 0:
                b = []
                while True:
                    b.append(bytearray(50_000_000))
        b = []
        while True:
            b.append(bytearray(50_000_000))
    """,
}


@pytest.mark.parametrize("way", sorted(MEMORY_BOMBS))
def test_memory_bombs_are_stopped(way):
    started = time.monotonic()
    result = run(MEMORY_BOMBS[way])
    assert not result.passed and time.monotonic() - started < LIMITS.timeout_s + 5
    if result.status == "failed":  # on a loaded machine the bomb may still be allocating at the time limit
        assert "MemoryError" in result.output or "Cannot allocate memory" in result.output, result.output
    time.sleep(0.2)
    assert not _fence_processes()


DISK_FILLERS = {
    "one growing file": """
        total = 0
        try:
            with open('big', 'wb') as f:
                while True:
                    f.write(b'x' * (1 << 20)); f.flush(); total += 1 << 20
        finally:
            print('WROTE', total)
    """,
    "many files": """
        total = 0
        try:
            for i in range(10_000):
                with open(f'part{i}', 'wb') as f:
                    f.write(b'x' * (1 << 20))
                total += 1 << 20
        finally:
            print('WROTE', total)
    """,
    "many empty files": """
        total = 0
        try:
            for i in range(1_000_000):
                open(f'empty{i}', 'w').close()
        finally:
            print('WROTE', total, 'files', i)
    """,
    "writable places outside the folder": """
        import posix
        for folder in ('/var/tmp', '/dev/shm', '/home', '/root', '/', '/run'):
            try:
                fd = posix.open(folder + '/raylm-h28-fill', posix.O_WRONLY | posix.O_CREAT, 0o666)
                posix.write(fd, b'x' * (1 << 20)); print('ESCAPED', folder)
            except OSError as error:
                print('refused', folder, error)
        print('WROTE', 0)
    """,
}


@pytest.mark.parametrize("way", sorted(DISK_FILLERS))
def test_filling_the_disk_is_bounded(way):
    result = run(DISK_FILLERS[way])
    assert "ESCAPED" not in result.output, result.output
    written = int(result.output.split("WROTE")[1].split()[0])
    assert written <= LIMITS.folder_mb * 2**20, result.output
    for folder in ("/var/tmp", "/dev/shm"):
        assert not os.path.exists(f"{folder}/raylm-h28-fill")

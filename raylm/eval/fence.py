"""The OS fence around one model-written program: run as `python -I fence.py SETTINGS_JSON < program.py`.

Why a separate launcher: the fence is built from Linux syscalls (`unshare(2)`, `mount(2)`,
`mount_setattr(2)`, Landlock) called through ctypes, in a fresh single-threaded process, never in the
threaded caller (forking a threaded process and running Python before exec is unsafe). Standard
library only; the caller is `raylm.eval.sandbox`.

What the launcher L does, with `mode: fence`:

1. Enter new user, mount, PID, network, IPC and UTS namespaces (`unshare(2)`). A non-root caller
   maps its own uid and gid into the user namespace (the one mapping an unprivileged process may
   write). A root caller forks a helper that, still root outside, maps uid/gid 0 and 65534
   (nobody): 0 for setting up, 65534 for the program.
2. Fork the program's process C, PID 1 of the new PID namespace (when C ends, the kernel kills every
   process left in it; C also dies with L, `PR_SET_PDEATHSIG`).
3. In C: mounts made private; for a root caller, directories nobody may not enter on the way to the
   Python installation (e.g. /root) are covered by an empty tmpfs into which only the needed
   subdirectory is bind-mounted; then every mount read-only and nosuid (`mount_setattr(2)`,
   recursive); a size-capped tmpfs on /tmp as the program's folder (its working directory, HOME and
   TMPDIR); a fresh /proc that shows only this PID namespace.
4. rlimits (CPU, address space, file size, processes counted in this user namespace, no core dumps).
5. A root caller's program drops to uid/gid 65534 with no supplementary groups; every capability is
   dropped (bounding, ambient, effective, permitted), `no_new_privs` is set.
6. Landlock where the kernel has it: writes only under /tmp (and /dev/null), reads only the Python
   installation, the system libraries it loads, /tmp, /proc and a few /dev files; executing any file
   denied; TCP bind/connect denied (ABI 4+); signals and abstract Unix sockets outside the sandbox
   denied (ABI 6+).
7. The in-process Python guards (`install_guards`), a second layer for honest mistakes; then the
   program runs in C's interpreter (no second interpreter start).

Before running the program, C reports on the status pipe (fd given in the settings): `ok <level>`
or one line naming the step that failed; the caller raises on the latter. With `mode: weak` (the
user's explicit opt-in) there are no namespaces or Landlock: rlimits and guards only, in the folder
given as the working directory.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = {"user": CLONE_NEWUSER, "mount": CLONE_NEWNS, "pid": CLONE_NEWPID, "net": CLONE_NEWNET,
              "ipc": CLONE_NEWIPC, "uts": CLONE_NEWUTS}

MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
SYS_MOUNT_SETATTR, AT_RECURSIVE = 442, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4

SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
FS_READ = FS_READ_FILE | FS_READ_DIR
FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
NET_ALL = 0x3          # bind and connect TCP (ABI 4)
SCOPE_ALL = 0x3        # abstract Unix sockets and signals (ABI 6)

NOBODY = 65534
FENCED_FOLDER = "/tmp"
# What the interpreter may read besides its own installation: the shared libraries extension
# modules load, the loader's cache, time zones, and a few devices.
SYSTEM_READS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache",
                "/etc/localtime", "/usr/share/zoneinfo", "/dev/urandom", "/dev/zero", "/proc")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class FenceError(RuntimeError):
    """A step of the fence could not be taken; its message names the step and the kernel's reason."""


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise FenceError(f"{what} failed: {os.strerror(code)} (errno {code})")
    return result


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 where Landlock is absent or disabled."""
    version = _libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return max(0, int(version))


def _encoded(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None, what: str) -> None:
    _check(_libc.mount(_encoded(source), _encoded(target), _encoded(fstype), flags, _encoded(data)), what)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


# ---- step 1: namespaces and the uid/gid maps ---------------------------------------------------------

def enter_namespaces() -> int:
    """Unshare every namespace; return the uid the program will run as."""
    flags = 0
    for flag in NAMESPACES.values():
        flags |= flag
    uid, gid = os.getuid(), os.getgid()
    if uid != 0:
        _check(_libc.unshare(flags), "unshare(user, mount, pid, net, ipc, uts namespaces)")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1\n")
        _write("/proc/self/gid_map", f"{gid} {gid} 1\n")
        return uid
    # Root: the maps with two ranges must be written from outside the new user namespace.
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(ready_w)
            os.close(done_r)
            os.read(ready_r, 1)
            parent = os.getppid()
            _write(f"/proc/{parent}/uid_map", f"0 0 1\n{NOBODY} {NOBODY} 1\n")
            _write(f"/proc/{parent}/gid_map", f"0 0 1\n{NOBODY} {NOBODY} 1\n")
            os.write(done_w, b"1")
            os._exit(0)
        except BaseException as error:  # noqa: BLE001 - reported to the parent through the pipe
            os.write(done_w, f"0writing the uid/gid maps of the user namespace failed: {error}".encode())
            os._exit(1)
    os.close(ready_r)
    os.close(done_w)
    try:
        _check(_libc.unshare(flags), "unshare(user, mount, pid, net, ipc, uts namespaces)")
    finally:
        os.write(ready_w, b"1")
        os.close(ready_w)
        answer = os.read(done_r, 4096)
        os.close(done_r)
        os.waitpid(helper, 0)
    if answer != b"1":
        raise FenceError(answer[1:].decode(errors="replace") or "the uid/gid map helper died")
    return NOBODY


# ---- step 3: the filesystem ---------------------------------------------------------------------------

def _blocked_for(path: str, uid: int) -> bool:
    """Whether `uid` (not root, no groups) may not search this directory."""
    info = os.stat(path)
    if info.st_uid == uid:
        return not info.st_mode & 0o100
    return not info.st_mode & 0o001


def expose(paths: list[str], uid: int) -> None:
    """Make each path reachable by `uid`: cover each ancestor it may not search with a tmpfs holding
    only a bind mount of the next directory on the way (the rest of that ancestor stays hidden)."""
    covered: dict[str, str] = {}
    for path in paths:
        parts = os.path.realpath(path).strip("/").split("/")
        for depth in range(1, len(parts)):
            ancestor = "/" + "/".join(parts[:depth])
            child = ancestor + "/" + parts[depth]
            if ancestor in covered:
                if covered[ancestor] != child:
                    raise FenceError(f"cannot expose both {covered[ancestor]} and {child} under {ancestor}")
                continue
            if not _blocked_for(ancestor, uid):
                continue
            keep = os.open(child, os.O_PATH | os.O_CLOEXEC)
            try:
                mode = os.stat(ancestor).st_mode & 0o7777 | 0o005
                _mount("tmpfs", ancestor, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={oct(mode)[2:]},size=64k",
                       f"mounting a tmpfs over {ancestor} (not searchable by uid {uid})")
                if os.path.isdir(f"/proc/self/fd/{keep}"):
                    os.mkdir(child)
                else:
                    os.close(os.open(child, os.O_CREAT | os.O_WRONLY, 0o644))
                _mount(f"/proc/self/fd/{keep}", child, None, MS_BIND | MS_REC, None, f"bind-mounting {child}")
            finally:
                os.close(keep)
            covered[ancestor] = child


def build_filesystem(settings: dict, uid: int, reads: list[str]) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None, "making the mounts private")
    if uid == NOBODY and os.getuid() == 0:
        expose(reads, uid)
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    _check(_libc.syscall(SYS_MOUNT_SETATTR, ctypes.c_int(-100), b"/", ctypes.c_uint(AT_RECURSIVE),
                         ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr))),
           "mount_setattr(/, read-only, recursive) (Linux 5.12+)")
    size_kb = int(settings["folder_mb"]) * 1024
    _mount("tmpfs", FENCED_FOLDER, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={size_kb}k,nr_inodes={int(settings['folder_inodes'])},mode=700,uid={uid},gid={uid}",
           "mounting a private tmpfs on /tmp")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None,
           "mounting a fresh /proc for the PID namespace (a container that masks /proc needs procMount: Unmasked)")


# ---- steps 4 to 6: limits, privileges, Landlock -------------------------------------------------------

def set_rlimits(settings: dict) -> None:
    memory = int(settings["memory_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    cpu = int(settings["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    size = int(settings["file_size_mb"]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    nproc = int(settings["nproc"])
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_privileges(uid: int) -> None:
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != errno.EINVAL:
            _check(-1, f"dropping capability {cap} from the bounding set")
    _check(_libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing ambient capabilities")
    if os.getuid() != uid:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset (dropping every capability)")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise FenceError("the program would run as uid 0")


def apply_landlock(abi: int, reads: list[str], writes: list[str]) -> None:
    """Writes only under `writes`, reads only under `reads` and `writes`, no execution at all."""
    handled_fs = (1 << 13) - 1
    if abi >= 2:
        handled_fs |= 1 << 13                  # REFER
    if abi >= 3:
        handled_fs |= FS_TRUNCATE
    if abi >= 5:
        handled_fs |= FS_IOCTL_DEV
    attr = _RulesetAttr(handled_fs, NET_ALL if abi >= 4 else 0, SCOPE_ALL if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                                   ctypes.c_uint32(0)), "landlock_create_ruleset")
    everything_but_execute = handled_fs & ~FS_EXECUTE
    try:
        for rights, paths in ((FS_READ, reads), (everything_but_execute, writes)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue
                try:
                    allowed = rights if os.path.isdir(f"/proc/self/fd/{fd}") else rights & FILE_RIGHTS
                    rule = _PathBeneath(allowed & handled_fs, fd)
                    _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset),
                                         ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), ctypes.byref(rule),
                                         ctypes.c_uint32(0)), f"landlock_add_rule({path})")
                finally:
                    os.close(fd)
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)),
               "landlock_restrict_self")
    finally:
        os.close(ruleset)


def python_reads() -> list[str]:
    """The Python installation: every sys.path entry (the standard library, its extension modules,
    site-packages and what .pth files add), which is everything `import` can reach."""
    return list(dict.fromkeys(os.path.realpath(p) for p in sys.path if p and os.path.exists(p)))


# ---- step 7: the Python guards, then the program ------------------------------------------------------

def install_guards(root: str) -> None:
    """Second layer only: refuse, at the Python level, writes outside `root`, processes, sockets, ctypes."""
    root = os.path.realpath(root)

    def inside(path) -> bool:
        if isinstance(path, int):
            return True
        full = os.path.realpath(os.path.join(root, os.fsdecode(os.fspath(path))))
        return full == root or full.startswith(root + os.sep)

    def refuse(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax+") and not inside(file):
            refuse(f"writing {file}")
        return real_open(file, mode, *args, **kwargs)
    builtins.open = io.open = guarded_open

    real_os_open = os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            refuse(f"writing {path}")
        return real_os_open(path, flags, *args, **kwargs)
    os.open = guarded_os_open

    def paths_inside(name, fn):
        def wrapper(*args, **kwargs):
            for arg in list(args[:2]) + [kwargs.get("src"), kwargs.get("dst")]:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    refuse(f"{name}({arg})")
            return fn(*args, **kwargs)
        return wrapper
    for name in ("remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace", "mkdir", "makedirs",
                 "chmod", "chown", "lchown", "link", "symlink", "truncate", "utime", "mkfifo", "mknod"):
        if hasattr(os, name):
            setattr(os, name, paths_inside(name, getattr(os, name)))
    for name in ("rmtree", "move", "copy", "copy2", "copyfile", "copytree", "chown"):
        setattr(shutil, name, paths_inside(name, getattr(shutil, name)))

    def disabled(what):
        def refuse_call(*args, **kwargs):
            refuse(what)
        return refuse_call
    for name in ("fork", "forkpty", "system", "popen", "execv", "execve", "execl", "execle", "execlp", "execlpe",
                 "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe", "posix_spawn", "posix_spawnp", "kill", "killpg", "setuid", "setgid", "chroot",
                 "putenv", "unsetenv"):
        if hasattr(os, name):
            setattr(os, name, disabled(f"os.{name}"))
    subprocess.Popen = disabled("subprocess")
    socket.socket = disabled("network access")
    socket.create_connection = disabled("network access")
    socket.socketpair = disabled("network access")
    sys.modules["ctypes"] = None
    sys.modules["_ctypes"] = None


def run_source(source: str, folder: str) -> None:
    path = os.path.join(folder, "program.py")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(source)
    install_guards(folder)

    namespace = {"__name__": "__main__", "__builtins__": builtins, "__file__": path}
    exec(compile(source, path, "exec"), namespace)


# ---- the two processes ---------------------------------------------------------------------------------

def _report(fd: int, line: str) -> None:
    try:
        os.write(fd, (line.replace("\n", " ") + "\n").encode())
    finally:
        os.close(fd)


def _exit_like(status: int) -> None:
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def _environment(folder: str) -> None:
    os.environ.clear()
    os.environ.update({"HOME": folder, "TMPDIR": folder, "PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0",
                       "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "LANG": "C.UTF-8"})


def fenced_child(settings: dict, uid: int) -> str:
    """PID 1 of the new PID namespace: build the filesystem, limit, Landlock, drop; return the level."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    reads = python_reads()
    build_filesystem(settings, uid, reads)
    _libc.sethostname(b"sandbox", 7)
    abi = landlock_abi()
    os.chdir(FENCED_FOLDER)
    set_rlimits(settings)
    if abi:
        apply_landlock(abi, reads + [p for p in SYSTEM_READS if os.path.exists(p)], [FENCED_FOLDER, "/dev/null"])
    drop_privileges(uid)
    level = "fence+landlock" if abi else "fence"
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    _environment(FENCED_FOLDER)
    return f"{level} uid={uid} landlock_abi={abi}"


def main() -> None:
    settings = json.loads(sys.argv[1])
    status_fd = int(settings["status_fd"])
    source = sys.stdin.buffer.read().decode("utf-8", "replace")
    if settings["mode"] == "weak":
        try:
            set_rlimits(settings)
            _environment(os.getcwd())
        except Exception as error:  # noqa: BLE001 - reported as one line to the caller
            _report(status_fd, f"error weak mode: {error}")
            os._exit(125)
        _report(status_fd, "ok weak")
        run_source(source, os.getcwd())
        return
    try:
        uid = enter_namespaces()
    except Exception as error:  # noqa: BLE001
        _report(status_fd, f"error {error}")
        os._exit(125)
    child = os.fork()
    if child == 0:
        try:
            level = fenced_child(settings, uid)
        except Exception as error:  # noqa: BLE001 - any failed step is reported as one line
            _report(status_fd, f"error {error}")
            os._exit(125)
        _report(status_fd, f"ok {level}")
        run_source(source, FENCED_FOLDER)
        return
    os.close(status_fd)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    _exit_like(status)


if __name__ == "__main__":
    main()

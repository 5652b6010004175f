"""What a failed stage tells its user: one raylm line, and the full story in a log file.

A run writes every log record (raylm's, Ray's and Ray Data's, tracebacks included) to a log file
(`<workspace>/logs/<command>-<time>-<pid>.log` for a local workspace, the temp folder's
`raylm-logs/` for an object-store one). Unless `--verbose`, the console shows each record on one
line, so the tracebacks that Ray and Ray Data print for a failed worker task go to that file only.

Stages and their steps say where they are with `stage(name)` / `step(name)`; an exception leaving one
is tagged with the stage and the innermost step, and `describe` turns it into the line the command
prints: the stage, the step, the error at the bottom of the chain (past Ray's wrappers), the file or
key at fault when the error names one, and the log file.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

from raylm.console import ours_or_warning, quiet_progress_bars

_log_path: str | None = None
_quiet = False
_handler: logging.FileHandler | None = None
LOGGERS = ("", "ray", "ray.data", "ray.train", "ray.tune")  # "" is the root logger (raylm's records)


_stages: list[str] = []  # the stages running now, innermost last (a pipeline's fine-tuning runs curate inside)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Code running inside stage `name`; an exception leaving it is tagged with the stage."""
    _stages.append(name)
    try:
        with _tagging_errors("raylm_stage", name):
            yield
    finally:
        _stages.pop()


@contextmanager
def step(name: str) -> Iterator[dict[str, float]]:
    """Code running step `name` of the current stage; the innermost step is the one named. A step that
    finishes says so on the console with its wall time (the progress of a stage that has no live line),
    and with its throughput when the block put `rows`, `bytes` or `tokens` in the dict it was given."""
    started = time.perf_counter()
    figures: dict[str, float] = {}
    with _tagging_errors("raylm_step", name):
        yield figures
    seconds = time.perf_counter() - started
    logging.getLogger("raylm").info("%s: %s done in %.1f s%s", _stages[-1] if _stages else "raylm", name, seconds,
                                    throughput(figures, seconds))


def throughput(figures: dict[str, float], seconds: float) -> str:
    """`: 1,234 rows, 3.0 MB at 1.5 MB/s` for what a step handled (empty when it said nothing)."""
    parts = []
    if "rows" in figures:
        parts.append(f"{int(figures['rows']):,} rows")
    if "bytes" in figures:
        parts.append(f"{figures['bytes'] / 1e6:.1f} MB at {figures['bytes'] / 1e6 / max(seconds, 1e-9):.2f} MB/s")
    if "tokens" in figures:
        parts.append(f"{int(figures['tokens']):,} tokens at {figures['tokens'] / max(seconds, 1e-9):,.0f} tokens/s")
    return ": " + ", ".join(parts) if parts else ""


@contextmanager
def _tagging_errors(attribute: str, value: str) -> Iterator[None]:
    """An exception leaving the block gets `attribute = value` unless an inner block set it first."""
    try:
        yield
    except BaseException as error:
        if getattr(error, attribute, None) is None:
            try:
                setattr(error, attribute, value)
            except (AttributeError, TypeError):  # an exception type that refuses attributes: untagged
                pass
        raise


def log_path() -> str | None:
    return _log_path


def quiet() -> bool:
    """A run log is open and `--verbose` was not given: the console shows raylm's lines, not Ray's."""
    return _quiet


@contextmanager
def chatter_to_log(progress_logger: str) -> Iterator[None]:
    """Unless --verbose: while the block runs, whatever the process writes to its stderr (fd 2) goes to
    the run log (a library's log records and progress bars, a subprocess's complaints), and records of
    `progress_logger` still reach the console, one line each. Without a run log, or verbose: no change."""
    if _handler is None or not _quiet or _log_path is None:
        yield
        return
    logger = logging.getLogger(progress_logger)
    sys.stderr.flush()
    saved = os.dup(2)
    log_fd = os.open(_log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    console = logging.StreamHandler(os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8"))
    console.setFormatter(OneLineFormatter(logging.Formatter("%(message)s")))
    propagate = logger.propagate
    logger.propagate = False  # the root's console handler writes to fd 2, now the log: no second copy
    logger.addHandler(console)
    logger.addHandler(_handler)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        logger.removeHandler(console)
        logger.removeHandler(_handler)
        logger.propagate = propagate
        console.close()


def open_run_log(workspace_root: str, command: str, verbose: bool) -> str:
    """Send every log record to a new log file and, unless `verbose`, keep console records to one line."""
    global _log_path
    if "://" in workspace_root and not workspace_root.startswith("file://"):
        folder = os.path.join(tempfile.gettempdir(), "raylm-logs")
    else:
        folder = os.path.join(os.path.abspath(workspace_root.removeprefix("file://")), "logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    global _handler, _quiet
    _handler = logging.FileHandler(path, encoding="utf-8")
    _handler.setLevel(logging.DEBUG)
    _handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    _log_path, _quiet = path, not verbose
    refresh_console()
    return path


def refresh_console() -> None:
    """Attach the run log to every logger in `LOGGERS` and, unless verbose, make their console one line
    (again after Ray and Ray Data set up their own loggers, which replaces their handlers)."""
    if _handler is None:
        return
    # deferred: pulls in ray.data, slow to import; its loggers are configured when it is imported
    import ray.data  # noqa: F401

    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _handler not in logger.handlers:
            logger.addHandler(_handler)
    if _quiet:
        quiet_console()


def close_run_log() -> None:
    """Detach the run log and give the console handlers their own formatters back (the command ended)."""
    global _handler, _log_path, _quiet
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _handler is not None and _handler in logger.handlers:
            logger.removeHandler(_handler)
        for handler in logger.handlers:
            if isinstance(handler.formatter, OneLineFormatter):
                handler.setFormatter(handler.formatter.inner)
            handler.removeFilter(ours_or_warning)
    if _handler is not None:
        _handler.close()
    _handler, _log_path, _quiet = None, None, False


def quiet_console() -> None:
    """Console handlers of raylm's and Ray's loggers print a record's first line only, no traceback.
    Called again once Ray and Ray Data have set up their own loggers."""
    quiet_progress_bars()
    for name in LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if _is_console(handler) and not isinstance(handler.formatter, OneLineFormatter):
                handler.setFormatter(OneLineFormatter(handler.formatter or logging.Formatter()))
            if name == "" and _is_console(handler) and ours_or_warning not in handler.filters:
                handler.addFilter(ours_or_warning)


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal: Ray's (which writes to whatever sys.stderr is when it
    emits) or a stream handler on stdout / stderr; not a file, not a test's capture buffer."""
    if type(handler).__name__ == "PlainRayHandler":
        return True
    streams = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
    return type(handler) is logging.StreamHandler and any(handler.stream is s for s in streams)


class OneLineFormatter(logging.Formatter):
    """The wrapped formatter's first line, without the traceback (which the run log keeps)."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        try:
            text = self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved
        first, _, rest = text.partition("\n")
        if rest or record.exc_info:
            first += f" [more in {_log_path}]" if _log_path else " [...]"
        return first


def chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors beneath it: Ray's `RayTaskError.cause`, `__cause__`, `__context__`."""
    found: list[BaseException] = []
    while error is not None and all(error is not seen for seen in found):
        found.append(error)
        inner = getattr(error, "cause", None)
        if not isinstance(inner, BaseException):
            inner = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        error = inner
    return found


def _from_ray(error: BaseException) -> bool:
    return any(kind.__module__.split(".")[0] == "ray" for kind in type(error).__mro__)


def root_cause(error: BaseException) -> BaseException:
    """The first error in the chain that is not one of Ray's wrappers (`RayTaskError`,
    `UserCodeException`): the error the stage's own code raised or met."""
    errors = chain(error)
    return next((e for e in errors if not _from_ray(e)), errors[-1])


def at_fault(error: BaseException) -> str | None:
    """The file or config key an error names, when it names one."""
    filename = getattr(error, "filename", None)
    if filename:
        return f"file {filename}"
    text = str(error)
    key = re.search(r"\b(data|model|train|tokenizer|finetune|eval|cluster|workspace|tracking|tune|plan)"
                    r"(\.[a-z_]+)+", text)
    if key:
        return f"key {key.group(0)}"
    path = re.search(r"(?:^|[\s'\"(])((?:/|s3://|gs://)[^\s'\")]+)", text)
    return f"file {path.group(1)}" if path else None


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Warning|Exit)): (.+)$", re.MULTILINE)


def _user_error_in_text(errors: list[BaseException]) -> tuple[str, str] | None:
    """The last non-Ray `Type: message` line of the remote tracebacks Ray keeps as text (a worker's
    exception chain does not survive as objects on the driver): the outermost error the code raised."""
    found = [(kind, message) for error in errors for kind, message in _ERROR_LINE.findall(str(error))
             if not kind.startswith("ray.")]
    return found[-1] if found else None


def describe(error: BaseException, command: str) -> str:
    """The one line a failed command prints."""
    cause = root_cause(error)
    kind, message = type(cause).__name__, str(cause).strip().split("\n")[0]
    if _from_ray(cause):
        remote = _user_error_in_text(chain(error))
        if remote:
            kind, message = remote[0].rsplit(".", 1)[-1], remote[1].strip()
    where = getattr(error, "raylm_stage", None) or command
    step_name = getattr(error, "raylm_step", None)
    line = f"raylm: {where} failed" + (f" in step {step_name!r}" if step_name else "") + f": {kind}"
    line += f": {message}" if message else ""
    fault = at_fault(cause) if not _from_ray(cause) else at_fault(Exception(message))
    if fault and fault.split(" ", 1)[1] not in message:
        line += f" ({fault})"
    if _log_path:
        line += f"; full log: {_log_path}"
    return line

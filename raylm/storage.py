"""Any URI a stage reads or writes, on any store: local paths, `s3://`, `gs://` and `http(s)://`.

One filesystem layer for all of them, so object stores need no branches of their own:
- `filesystem_for(uri)`: the pyarrow filesystem and path of a URI. Local paths and `s3://` / `gs://` go
  through `pyarrow.fs` (S3-compatible stores through `AWS_ENDPOINT_URL`); `http(s)://` through fsspec's
  HTTP filesystem wrapped for pyarrow, so Ray Data streams it like any other file.
- `list_files(uri)`: a file, every file under a folder, or the files a glob matches (`*`, `?`, `[...]`
  within one path segment, `**` across segments), the same way on every store.
- `check_sources` and `probe_workspace`: run before Ray starts, so a glob that matches nothing, a missing
  bucket, bad credentials or an unreachable endpoint is one line naming the URI, not a traceback minutes in.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import uuid
from typing import Callable, TypeVar

import pyarrow.fs as pafs
from fsspec.implementations.http import HTTPFileSystem

HTTP_SCHEMES = ("http://", "https://")
OBJECT_SCHEMES = ("s3://", "gs://", "gcs://")
PROBE_TIMEOUT_S = 30.0
PROBE_PREFIX = ".raylm-probe-"

T = TypeVar("T")


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def is_http(uri: str) -> bool:
    return uri.startswith(HTTP_SCHEMES)


def is_object_store(uri: str) -> bool:
    return uri.startswith(OBJECT_SCHEMES)


def filesystem_for(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that reads `uri`, and the path of `uri` on it."""
    if is_http(uri):
        return pafs.PyFileSystem(pafs.FSSpecHandler(HTTPFileSystem())), uri
    if is_object_store(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri.removeprefix("file://"))


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob as a regex over whole paths: `*`, `?` and `[...]` stay inside one segment, `**/` spans any."""
    out, index = [], 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**/", index):
            out.append("(?:[^/]*/)*")
            index += 3
            continue
        if pattern.startswith("**", index):
            out.append(".*")
            index += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", index + 1)
            if end < 0:
                out.append(re.escape(char))
            else:
                body = pattern[index + 1:end]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                index = end
        else:
            out.append(re.escape(char))
        index += 1
    return re.compile("".join(out) + r"\Z")


def _glob(fs: pafs.FileSystem, pattern: str) -> list[str]:
    segments = pattern.split("/")
    fixed = next(i for i, segment in enumerate(segments) if is_glob(segment))
    base = "/".join(segments[:fixed])
    matcher = glob_regex(pattern)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return sorted(info.path for info in fs.get_file_info(selector)
                  if info.type == pafs.FileType.File and matcher.match(info.path))


def list_files(uri: str) -> tuple[list[str], str, pafs.FileSystem]:
    """The files of a file, folder or glob URI, the folder they are relative to, and their filesystem.

    Hidden files (`.name`) and `_SUCCESS`-style markers under a folder are skipped. An HTTP URL is one file.
    """
    fs, path = filesystem_for(uri)
    if is_http(uri):
        return [path], path.rsplit("/", 1)[0], fs
    if is_glob(path):
        files = _glob(fs, path)
        root = path[:path.find(next(ch for ch in path if ch in "*?["))].rsplit("/", 1)[0]
        return files, root, fs
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File
                       and not any(part.startswith((".", "_")) for part in i.path[len(path):].split("/")))
        return files, path, fs
    return ([path] if info.type == pafs.FileType.File else []), path.rsplit("/", 1)[0], fs


def _within(seconds: float, what: str, call: Callable[[], T]) -> T:
    """`call()`, or TimeoutError naming `what` when it has not answered within `seconds`."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(call).result(timeout=seconds)
    except concurrent.futures.TimeoutError:
        raise TimeoutError(f"no answer from {what} within {seconds:.0f} s (endpoint unreachable?)") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def remote_source_problem(key: str, uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> tuple[str | None, int]:
    """A one-line problem for a remote source that cannot be listed or matches nothing, and its file count."""
    try:
        files, _, _ = _within(timeout_s, uri, lambda: list_files(uri))
    except Exception as error:  # noqa: BLE001 - any store's error becomes the one line that names the source
        return f"{key} = {uri!r}: cannot be read: {one_line(error)}", 0
    if not files:
        what = "no file matches the pattern" if is_glob(uri) else "no file at"
        return f"{key} = {uri!r}: {what} {uri!r}", 0
    return None, len(files)


def probe_workspace(root: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Write, read back and delete a small object under the workspace root; a one-line problem, or None."""
    fs, base = filesystem_for(root)
    probe = f"{base.rstrip('/')}/{PROBE_PREFIX}{uuid.uuid4().hex}"
    content = uuid.uuid4().hex.encode()

    def round_trip() -> None:
        if not is_object_store(root):
            fs.create_dir(base, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(content)
        with fs.open_input_stream(probe) as stream:
            if stream.read() != content:
                raise OSError("the object read back differs from the one written")
        fs.delete_file(probe)

    try:
        _within(timeout_s, root, round_trip)
    except Exception as error:  # noqa: BLE001
        return f"workspace.root = {root!r}: cannot write, read and delete a test object there: {one_line(error)}"
    return None

"""Corpus sources: files, folders, globs (local, `s3://`, `gs://`), `http(s)://` files and the built-in
`python-stdlib` corpus, read with Ray Data.

Every source becomes rows of the document contract `{id, text, source, meta}` plus the curation
bookkeeping columns `reason` and `detail` (empty while a row is kept) and `n_bytes`. A line or file
that cannot be read (bad JSON, undecodable bytes, a missing text field) becomes a row already marked
`parse_error` with the file and line in `detail`: it is counted and rejected, never dropped. A
compressed or parquet file damaged part way (a truncated download, a broken footer) keeps every row
read before the damage and adds one `parse_error` row saying where the stream broke; a file that
cannot be opened at all is one `parse_error` row. A JSON-lines file with no record gives no row (the
stage counts such files in its stats).

The per-file decoding is a plain function (`decode_file`), so it is tested without Ray; the driver
only lists file names, never reads the corpus.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from typing import Any, Iterator

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import zstandard

from raylm.config import SourceConfig
from raylm.storage import list_files

log = logging.getLogger("raylm")

DOC_COLUMNS = ("id", "text", "source", "meta", "reason", "detail", "n_bytes")
STDLIB_EXTENSIONS = (".py", ".rst", ".txt")
TEXT_EXTENSIONS = {".txt": "text", ".md": "markdown", ".rst": "text", ".py": "text"}
JSON_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json"}


def make_id(source: str, locator: str, text: str) -> str:
    """Stable document id from its source, its place in the source and its content."""
    digest = hashlib.sha1(f"{source}\0{locator}\0".encode() + text.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:20]


def document(source: str, locator: str, text: str, meta: dict[str, Any] | None = None,
             doc_id: str | None = None) -> dict[str, Any]:
    return {
        "id": doc_id if doc_id is not None else make_id(source, locator, text),
        "text": text,
        "source": source,
        "meta": json.dumps({"locator": locator, **(meta or {})}, sort_keys=True, default=str),
        "reason": "",
        "detail": "",
        "n_bytes": len(text.encode("utf-8", "surrogatepass")),
    }


def unreadable(source: str, locator: str, why: str, raw: bytes = b"") -> dict[str, Any]:
    """A row for input that could not be read: rejected as `parse_error`, with where and why."""
    return {
        "id": make_id(source, locator, repr(raw[:64])),
        "text": "",
        "source": source,
        "meta": json.dumps({"locator": locator}),
        "reason": "parse_error",
        "detail": f"{locator}: {why}",
        "n_bytes": len(raw),
    }


# ----------------------------------------------------------------------------------------------
# Per-file decoding (plain functions; Ray Data calls them through flat_map)


def detect_format(path: str, declared: str) -> str:
    if declared != "auto":
        return declared
    name = path.lower()
    for suffix in (".gz", ".zst", ".bz2"):
        name = name.removesuffix(suffix)
    ext = os.path.splitext(name)[1]
    if ext in JSON_EXTENSIONS:
        return JSON_EXTENSIONS[ext]
    if ext == ".parquet":
        return "parquet"
    return TEXT_EXTENSIONS.get(ext, "text")


def decode_file(row: dict[str, Any], source: SourceConfig, root: str | None = None) -> Iterator[dict[str, Any]]:
    """Turn one file (`{"bytes", "path"}`) into document rows; a compressed file damaged part way keeps
    the rows before the damage and ends with one `parse_error` row saying where the stream broke."""
    path, raw = row["path"], row["bytes"]
    label = source.label
    locator = file_locator(path, root)
    fmt = detect_format(path, source.format)
    raw, broken = decompress(path, raw)
    if broken is not None and fmt != "jsonl" and source.doc_per != "paragraph":
        yield unreadable(label, locator, broken)  # one document per file: a part of it is not that document
        return
    if fmt in ("jsonl", "json"):
        if broken is not None:  # the complete lines before the damage are rows; the cut line is not
            complete = raw[:raw.rfind(b"\n") + 1]
            lines = complete.count(b"\n")
            yield from _decode_json_records(complete, fmt, label, locator, source)
            yield unreadable(label, f"{locator}:{lines + 1}",
                             f"{broken}; the {lines} line(s) before it were read", raw[len(complete):])
            return
        yield from _decode_json_records(raw, fmt, label, locator, source)
        return
    if broken is not None:  # paragraphs: those complete before the damage are documents
        cut = raw.rfind(b"\n\n")
        raw, rest = (raw[:cut], raw[cut:]) if cut >= 0 else (b"", raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        yield unreadable(label, locator, f"not valid UTF-8 at byte {error.start}", raw)
        return
    if "\x00" in text[:8192]:
        yield unreadable(label, locator, "binary file (NUL bytes)", raw)
        return
    if source.doc_per == "paragraph":
        blocks = _paragraphs(text)
        for number, block in enumerate(blocks):
            yield document(label, f"{locator}#{number}", block)
        if broken is not None:
            yield unreadable(label, f"{locator}#{len(blocks)}",
                             f"{broken}; the {len(blocks)} paragraph(s) before it were read", rest)
    else:
        yield document(label, locator, text)


def file_locator(path: str, root: str | None) -> str:
    return os.path.relpath(path, root) if root and not path.startswith(("s3:", "gs:")) else path


def read_and_decode_file(row: dict[str, Any], source: SourceConfig, root: str | None,
                         filesystem: pafs.FileSystem | None) -> Iterator[dict[str, Any]]:
    """Read one file's bytes as they are on disk (no codec applied) and decode them; a file that
    cannot be read at all is one `parse_error` row."""
    path = row["path"]
    try:
        raw = read_raw_bytes(path, filesystem)
    except OSError as error:
        yield unreadable(source.label, file_locator(path, root), f"cannot be read: {error}")
        return
    yield from decode_file({"path": path, "bytes": raw}, source, root)


def read_raw_bytes(path: str, filesystem: pafs.FileSystem | None) -> bytes:
    """The file's stored bytes; `compression=None` stops Arrow decompressing by extension (a truncated
    `.gz` then fails in the reader, before any row of it is kept)."""
    filesystem = filesystem or pafs.LocalFileSystem()
    with filesystem.open_input_stream(path, compression=None) as stream:
        return stream.read()


_MAGIC = {".gz": b"\x1f\x8b", ".zst": b"\x28\xb5\x2f\xfd", ".bz2": b"BZh"}
_DECOMPRESSORS = {
    ".gz": lambda: zlib.decompressobj(wbits=31),
    ".zst": lambda: zstandard.ZstdDecompressor().decompressobj(),
    ".bz2": bz2.BZ2Decompressor,
}
DECOMPRESS_CHUNK = 1 << 16
COMPRESSED_SUFFIXES = tuple(_MAGIC)


def decompress(path: str, raw: bytes) -> tuple[bytes, str | None]:
    """Decompress by extension, streaming: the bytes decoded, and None or where and why the stream broke
    (the bytes then are those decoded before the damage). Several members / frames one after the
    other are read in turn; bytes without the codec's magic number are taken as not compressed."""
    suffix = next((s for s in _MAGIC if path.endswith(s)), None)
    if suffix is None or not raw.startswith(_MAGIC[suffix]):
        return raw, None
    decoded: list[bytes] = []
    start = 0
    while start < len(raw):
        decompressor = _DECOMPRESSORS[suffix]()
        member_start = start
        while not decompressor.eof:
            if start >= len(raw):
                size = sum(len(piece) for piece in decoded)
                return b"".join(decoded), (f"compressed stream ends early (truncated) at compressed byte {len(raw)}, "
                                           f"after {size} decompressed bytes")
            piece = raw[start:start + DECOMPRESS_CHUNK]
            try:
                decoded.append(decompressor.decompress(piece))
            except Exception as error:  # noqa: BLE001 - any codec failure is damage at this place of the file
                size = sum(len(chunk) for chunk in decoded)
                return b"".join(decoded), (f"compressed stream corrupt within compressed bytes {start}-"
                                           f"{start + len(piece)}, after {size} decompressed bytes ({error})")
            start += len(piece)
        start -= len(decompressor.unused_data)
        if start <= member_start or not raw[start:].strip(b"\0"):  # trailing zero padding ends the file
            break
    return b"".join(decoded), None


def _paragraphs(text: str) -> list[str]:
    return [block for block in text.replace("\r\n", "\n").split("\n\n") if block.strip()]


def _decode_json_records(raw: bytes, fmt: str, label: str, locator: str, source: SourceConfig) -> Iterator[dict[str, Any]]:
    if fmt == "json":
        if not raw.strip():  # an empty file holds no record: no row
            return
        try:
            loaded = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            yield unreadable(label, locator, f"not valid JSON: {error}", raw)
            return
        except RecursionError:
            yield unreadable(label, locator, "JSON nested too deeply to read", raw)
            return
        records = loaded if isinstance(loaded, list) else [loaded]
        for number, record in enumerate(records):
            yield _record_to_row(record, label, f"{locator}[{number}]", source)
        return
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{locator}:{number}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            yield unreadable(label, where, f"not valid UTF-8 at byte {error.start}", line)
            continue
        except json.JSONDecodeError as error:
            yield unreadable(label, where, f"not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})", line)
            continue
        except RecursionError:  # [[[[... deeper than the interpreter's stack
            yield unreadable(label, where, "JSON nested too deeply to read", line)
            continue
        yield _record_to_row(record, label, where, source)


def _record_to_row(record: Any, label: str, where: str, source: SourceConfig) -> dict[str, Any]:
    if not isinstance(record, dict):
        return unreadable(label, where, f"expected a JSON object, got {type(record).__name__}")
    text = record.get(source.text_field)
    if not isinstance(text, str):
        if source.text_field not in record:
            why = "missing"
        else:
            why = "null" if text is None else f"not a string ({type(text).__name__})"
        return unreadable(label, where, f"text field {source.text_field!r} {why}", json.dumps(record)[:64].encode())
    meta = {k: v for k, v in record.items() if k not in (source.text_field, source.id_field)}
    doc_id = None
    if source.id_field and record.get(source.id_field) is not None:
        doc_id = make_id(label, str(record[source.id_field]), "")
    return document(label, where, text, meta, doc_id)


# ----------------------------------------------------------------------------------------------
# Listing (metadata only) and the Ray Data reader


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(max_bytes: int | None) -> list[str]:
    """The standard library's .py/.rst/.txt files (not site-packages), a stable sample by size."""
    root = stdlib_root()
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__", "dist-packages"))
        for name in names:
            if name.endswith(STDLIB_EXTENSIONS):
                files.append(os.path.join(folder, name))
    return _sample_by_size(files, max_bytes, root)


def _sample_by_size(files: list[str], max_bytes: int | None, root: str) -> list[str]:
    if max_bytes is None:
        return sorted(files)
    ranked = sorted(files, key=lambda f: hashlib.sha1(os.path.relpath(f, root).encode()).hexdigest())
    chosen, total = [], 0
    for path in ranked:
        size = os.path.getsize(path)
        if total + size > max_bytes and chosen:
            continue
        chosen.append(path)
        total += size
        if total >= max_bytes:
            break
    return sorted(chosen)


def list_source_files(source: SourceConfig) -> tuple[list[str], str | None, pafs.FileSystem | None]:
    """File paths of a source, the root they are relative to, and the filesystem to read them with."""
    if source.path.startswith("hf://"):
        return [], None, None
    if source.path == "python-stdlib":
        return list_stdlib_files(source.max_bytes), stdlib_root(), None
    if "://" in source.path and not source.path.startswith("file://"):  # s3://, gs://, http(s)://
        files, root, fs = list_files(source.path)
        log.info("data source %s: %d file(s)", source.path, len(files))
        return files, root, fs
    path = source.path.removeprefix("file://")
    if os.path.isdir(path):
        files = sorted(
            os.path.join(folder, name)
            for folder, _, names in os.walk(path)
            for name in names
            if not name.startswith(".")
        )
        root = path
    elif any(ch in path for ch in "*?["):
        files = sorted(f for f in glob.glob(path, recursive=True) if os.path.isfile(f))
        root = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(path)
    else:
        files, root = [path], os.path.dirname(path)
    files = [os.path.abspath(f) for f in files]
    return _sample_by_size(files, source.max_bytes, os.path.abspath(root)), os.path.abspath(root), None


def read_huggingface(source: SourceConfig):
    """A Hugging Face dataset by name (`hf://org/name`), through `datasets` (needs the network or a cache)."""
    # deferred: pulls in ray, slow to import; only this path needs it
    import ray.data

    try:
        # deferred: pulls in datasets, slow to import; only this path needs it
        import datasets
    except ImportError as error:
        raise ImportError(f"data source {source.path!r} needs the `datasets` package") from error
    name = source.path.removeprefix("hf://")
    try:
        loaded = datasets.load_dataset(name, split=source.split)
    except Exception as error:  # noqa: BLE001 - offline, unknown name, gated: say which source
        raise FileNotFoundError(f"data source {source.path!r} (split {source.split!r}) cannot be loaded: {error}") from error
    loaded = loaded.map(lambda _, index: {"__row": index}, with_indices=True)
    return ray.data.from_huggingface(loaded).map(
        _hf_row_to_doc, fn_kwargs={"source": source, "where": f"{source.path}:{source.split}"})


def _hf_row_to_doc(row: dict[str, Any], source: SourceConfig, where: str) -> dict[str, Any]:
    number = row.pop("__row")
    locator = f"{where}:{row.get(source.id_field) if source.id_field else number}"
    return _record_to_row(row, source.label, locator, source)


def read_source(source: SourceConfig, num_blocks: int | None = None):
    """A Ray Dataset of document rows for one source."""
    if source.path.startswith("hf://"):
        return read_huggingface(source)
    files, root, filesystem = list_source_files(source)
    if not files:
        raise FileNotFoundError(f"data source {source.path!r} has no files")
    parquet = set(f for f in files if detect_format(f, source.format) == "parquet")
    others = [f for f in files if f not in parquet]
    parts = []
    # Each task reads its files itself (not `read_binary_files` / `read_parquet`): a damaged file then
    # becomes rows plus one `parse_error` row inside the task instead of an error that ends the stage.
    if others:
        parts.append(_file_rows(others, num_blocks).flat_map(
            read_and_decode_file, fn_kwargs={"source": source, "root": root, "filesystem": filesystem}))
    if parquet:
        parts.append(_file_rows(sorted(parquet), num_blocks).flat_map(
            decode_parquet_file, fn_kwargs={"source": source, "root": root, "filesystem": filesystem}))
    dataset = parts[0]
    for extra in parts[1:]:
        dataset = dataset.union(extra)
    return dataset


def _file_rows(files: list[str], num_blocks: int | None):
    """One `{"path"}` row per file, in up to `num_blocks` blocks (by default one per file, up to 200)."""
    # deferred: pulls in ray, slow to import; only this path needs it
    import ray.data

    blocks = min(len(files), num_blocks or 200)
    return ray.data.from_items([{"path": path} for path in files], override_num_blocks=blocks)


def decode_parquet_file(row: dict[str, Any], source: SourceConfig, root: str | None,
                        filesystem: pafs.FileSystem | None, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Document rows of one parquet file. A file whose footer cannot be read is one `parse_error` row;
    one damaged part way keeps the rows of the batches before the damage and adds one `parse_error`
    row naming the row group and row where reading broke."""
    path = row["path"]
    label, locator = source.label, file_locator(path, root)
    try:
        parquet = pq.ParquetFile(path, filesystem=filesystem)
    except Exception as error:  # noqa: BLE001 - a broken footer, not parquet at all, unreadable: this file only
        yield unreadable(label, locator, f"cannot be opened as parquet: {error}")
        return
    rows = 0
    group = 0
    try:
        for group in range(parquet.num_row_groups):
            for batch in parquet.iter_batches(batch_size=batch_size, row_groups=[group]):
                for record in batch.to_pylist():
                    rows += 1
                    key = record.get(source.id_field) if source.id_field else ""
                    yield _record_to_row(record, label, f"{locator}:{key}", source)
    except Exception as error:  # noqa: BLE001 - damage inside the file: what was read before it stands
        yield unreadable(label, f"{locator}#row_group={group}",
                         f"parquet data damaged in row group {group} of {parquet.num_row_groups}, "
                         f"after row {rows}; the {rows} row(s) before it were read ({error})")


def empty_files(source: SourceConfig, shown: int = 20) -> dict[str, Any]:
    """How many of a source's files hold no byte (they give no row), and the first `shown` of them:
    from the listing's metadata, no file is read."""
    if source.path.startswith("hf://"):
        return {"count": 0, "files": []}
    files, root, filesystem = list_source_files(source)
    infos = (filesystem or pafs.LocalFileSystem()).get_file_info(files)
    empty = [file_locator(info.path, root) for info in infos if info.size == 0]
    return {"count": len(empty), "files": empty[:shown]}

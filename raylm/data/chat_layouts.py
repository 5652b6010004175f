"""The instruction-data layouts people bring, read into one conversation model (a list of {role, content}).

Layouts (`finetune.format`):

    messages           {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}  (OpenAI / TRL)
    prompt_completion  {"prompt": ..., "completion": ...}  (TRL's standard; both may also be message lists)
    prompt_response    {"prompt": ..., "response": ...}
    sharegpt           {"conversations": [{"from": "system"|"human"|"gpt"|"user"|"assistant", "value": ...}]}
    alpaca             {"instruction": ..., "input": optional, "output": ...}  (user turn: the instruction, then
                       a blank line and the input when it is not empty)
    text               plain text for continued pretraining (the curation path)

`auto` (the default) reads each row by the layout its keys match and decides between chat and text from
the first rows, refusing a file whose rows match no layout and have no text field: raylm never falls to
plain text silently. `finetune.columns` renames the file's columns to these names first
(`{prompt: question, response: answer}`).

Records come from `.jsonl`/`.ndjson`, `.json` (an array or one object), `.parquet`, their `.gz`/`.zst`/`.bz2`
variants, and `hf://org/name` datasets (split `train`, or `hf://org/name:split`). Reading is plain
Python (no Ray): instruction sets are small, and the driver reads the first rows before Ray starts.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator

from raylm.config import COLUMN_NAMES  # noqa: F401 - the keys of finetune.columns, named with the layouts
from raylm.data.sources import COMPRESSED_SUFFIXES, decompress, detect_format

LAYOUTS = ("messages", "prompt_completion", "prompt_response", "sharegpt", "alpaca")
FORMATS = ("auto", *LAYOUTS, "text", "chat")  # chat: any chat layout, never text (the older setting)
REQUIRED = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
            "prompt_response": ("prompt", "response"), "sharegpt": ("conversations",),
            "alpaca": ("instruction", "output")}
ACCEPTED = ("messages (role/content), prompt+completion, prompt+response, conversations (ShareGPT from/value), "
            "instruction+output (Alpaca), text")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
PEEK_ROWS = 5


class LayoutError(ValueError):
    """Fine-tuning data that matches no layout (or not the one named); one line naming the file."""


def rename_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """The record with the file's column names mapped to the layout names (`finetune.columns`)."""
    if not columns:
        return record
    renamed = dict(record)
    for name, column in columns.items():
        if column in record:
            renamed.pop(column, None)
            renamed[name] = record[column]
    return renamed


def layout_of(record: dict[str, Any]) -> str | None:
    """The layout a record's keys match (the most specific first), or None."""
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "prompt" in record:
        return "prompt_response"  # also a prompt with its answer missing: a bad row of this layout, not text
    return None


def _string(record: dict[str, Any], key: str, what: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        why = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise ValueError(f"{what}: `{key}` is {why}")
    return value


def _message_list(items: Any, key: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict[str, str]]:
    if not isinstance(items, list):
        raise ValueError(f"`{key}` must be a list, got {type(items).__name__}")
    turns = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise ValueError(f"{key}[{index}] must be an object with `{role_key}` and `{content_key}`")
        if item[role_key] not in roles:
            raise ValueError(f"{key}[{index}].{role_key} = {item[role_key]!r}: expected one of {list(roles)}")
        if not isinstance(item[content_key], str):
            raise ValueError(f"{key}[{index}].{content_key} must be a string")
        turns.append({"role": roles[item[role_key]], "content": item[content_key]})
    return turns


def _single_turn(user: str, assistant: str, system_prompt: str | None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [{"role": "system", "content": system_prompt}, *turns] if system_prompt else turns


def turns_of(record: dict[str, Any], layout: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """The turns of one record read as `layout` (roles not yet checked); ValueError says what is wrong."""
    plain_roles = {role: role for role in ("system", "user", "assistant")}
    if layout == "messages":
        return _message_list(record.get("messages"), "messages", "role", "content", plain_roles)
    if layout == "sharegpt":
        items = record.get("conversations")
        if isinstance(items, list) and items and isinstance(items[0], dict) and "role" in items[0]:
            return _message_list(items, "conversations", "role", "content", plain_roles)
        return _message_list(items, "conversations", "from", "value", SHAREGPT_ROLES)
    if layout == "alpaca":
        instruction = _string(record, "instruction", "alpaca row")
        extra = record.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"alpaca row: `input` is a {type(extra).__name__}, not a string")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return _single_turn(user, _string(record, "output", "row has no assistant turn"), system_prompt)
    if layout == "prompt_completion" and isinstance(record.get("prompt"), list):
        prompt = _message_list(record["prompt"], "prompt", "role", "content", plain_roles)
        return prompt + _message_list(record.get("completion"), "completion", "role", "content", plain_roles)
    if layout in ("prompt_completion", "prompt_response"):
        answer = "completion" if layout == "prompt_completion" else "response"
        prompt = _string(record, "prompt", f"{layout} row")
        return _single_turn(prompt, _string(record, answer, "row has no assistant turn"), system_prompt)
    raise ValueError(f"unknown layout {layout!r}")


# ----------------------------------------------------------------------------------------------
# Reading records


def is_huggingface(path: str) -> bool:
    return path.startswith("hf://")


def is_record_file(path: str) -> bool:
    """A single local file whose rows are JSON objects or parquet records (compressed or not)."""
    return os.path.isfile(path) and detect_format(path, "auto") in ("jsonl", "json", "parquet")


def read_records(path: str) -> Iterator[tuple[str, Any]]:
    """(`file:line`, record) for every record of a jsonl/json/parquet file (compressed or not) or hf:// set."""
    if is_huggingface(path):
        yield from _huggingface_records(path)
        return
    fmt = detect_format(path, "auto")
    if fmt == "parquet":
        # deferred: pulls in pyarrow's parquet reader; only this path needs it
        import pyarrow.parquet as pq

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                number += 1
                yield f"{path}:{number}", record
        return
    if fmt == "jsonl" and not path.endswith(COMPRESSED_SUFFIXES):  # line by line: a peek reads only the start
        with open(path, "rb") as handle:
            yield from _json_lines(path, handle)
        return
    with open(path, "rb") as handle:
        raw, damage = decompress(path, handle.read())
    if damage is not None:  # fine-tuning data is small and curated: a damaged file is refused, not cut short
        raise LayoutError(f"{path}: {damage}")
    if fmt == "json":
        try:
            loaded = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LayoutError(f"{path}: not valid JSON ({error})") from None
        for index, record in enumerate(loaded if isinstance(loaded, list) else [loaded]):
            yield f"{path}[{index}]", record
        return
    yield from _json_lines(path, raw.split(b"\n"))


def _json_lines(path: str, lines: Iterable[bytes]) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                yield f"{path}:{number}", error


def _huggingface_records(path: str) -> Iterator[tuple[str, Any]]:
    name, _, split = path.removeprefix("hf://").partition(":")
    try:
        # deferred: pulls in datasets, slow to import; only this path needs it
        import datasets
    except ImportError as error:
        raise ImportError(f"finetune.data {path!r} needs the `datasets` package") from error
    try:
        loaded = datasets.load_dataset(name, split=split or "train")
    except Exception as error:  # noqa: BLE001 - offline, unknown name, gated: say which data
        raise LayoutError(f"finetune.data {path!r} cannot be loaded: {error}") from None
    for index, record in enumerate(loaded):
        yield f"{path}[{index}]", record


def first_records(path: str, count: int = PEEK_ROWS) -> list[dict[str, Any]]:
    """The first `count` JSON-object records (rows that are not objects are skipped)."""
    found = []
    for _, record in read_records(path):
        if isinstance(record, dict):
            found.append(record)
            if len(found) >= count:
                break
    return found


# ----------------------------------------------------------------------------------------------
# Choosing the format


def choose_format(path: str, fmt: str, columns: dict[str, str] | None = None) -> str:
    """`text` or a layout name for `finetune.data`; LayoutError (one line) when the data fits neither.

    `auto` on a file of records: the layout of the first rows (`messages`... as `layout_of` orders them),
    else `text` when they have a text field, else refused. Anything that is not a record file (plain text,
    a folder, a glob) is `text` under `auto`. A named layout must find its keys in the first row.
    """
    columns = columns or {}
    if fmt == "text":
        return "text"
    if not (is_huggingface(path) or is_record_file(path)):
        if fmt == "auto":
            return "text"
        raise LayoutError(f"{path}: finetune.format = {fmt!r} needs a .jsonl, .json or .parquet file (or hf://) "
                          f"of records; use finetune.format = 'text' for plain text")
    records = [rename_columns(record, columns) for record in first_records(path)]
    if not records:
        raise LayoutError(f"{path}: no JSON object records to fine-tune on (accepted layouts: {ACCEPTED})")
    keys = sorted({key for record in records for key in record})
    hint = "; set finetune.format and finetune.columns (e.g. {prompt: question, response: answer}) for other names"
    if fmt in LAYOUTS:
        missing = [key for key in REQUIRED[fmt] if key not in records[0]]
        if missing:
            raise LayoutError(f"{path}: finetune.format = {fmt!r} needs the keys {list(REQUIRED[fmt])} but the first "
                              f"row has the keys {sorted(records[0])}{hint}")
        return fmt
    layouts = [layout_of(record) for record in records]
    found = next((layout for layout in layouts if layout), None)
    if found:
        return found
    if fmt == "auto" and any(isinstance(record.get("text"), str) for record in records):
        return "text"
    raise LayoutError(f"{path}: rows with the keys {keys} match no fine-tuning layout"
                      f"{'' if fmt == 'chat' else ' and have no text field'} (accepted: {ACCEPTED}){hint}")

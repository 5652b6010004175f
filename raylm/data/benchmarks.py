"""Readers for the benchmark files raylm evaluates on, in the layouts of `../shared/data/benchmarks`.

One reader per layout turns a file into `BenchmarkItem`s: the task name, a stable item id
(`<task>/<index in file order>`), the parsed record, and the item's full text (question, choices,
answers) for n-gram matching. Curation's decontamination and evaluation's task converters both read
benchmarks through here, so an item has the same id in the contamination index and in the scores.

Layouts (see the data folder's README):
- ARC (llm-foundry ICL jsonl): `{"query": "Question: ...", "choices": [...], "gold": int}`
- HellaSwag (klosax text, bz2): 6 lines per item: `label: context`, gold index, 4 endings
- MMLU (hendrycks csv, no header): question, A, B, C, D, answer letter; one file per subject
- TruthfulQA (`mc_task.json`): question with `mc1_targets` / `mc2_targets` {answer: 0|1}
- GSM8K (jsonl): `{"question", "answer"}`, the answer ends with `#### N`
- HumanEval (gzip jsonl): `{"task_id", "prompt", "canonical_solution", "test", "entry_point"}`
- MT-Bench (jsonl): `{"question_id", "category", "turns": [...]}`

Scoring shapes a user's own jsonl can take (`read_shape`), each under the field names its file uses
(`fields`: shape field -> the file's field, or a list of fields gathered into one list):
- `arc` (multiple choice, shared context): `query`, `choices`, `gold`
- `partial` (per-choice contexts, one continuation; WinoGrande's): `context_options`, `continuation`, `gold`
- `cloze` (last word / continuation, LAMBADA's): `context`, `continuation`
- `generation` (free answer, exact match; GSM8K's): `query`, `answer`

A file that does not parse, or a record without a field its layout needs, raises `BenchmarkFileError`
naming the file, the line and what was expected.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

MMLU_LETTERS = "ABCD"


@dataclass(frozen=True)
class BenchmarkItem:
    task: str
    item_id: str
    record: dict[str, Any] = field(compare=False, hash=False)
    text: str = field(compare=False)


class BenchmarkFileError(ValueError):
    """A benchmark file that cannot be read in its layout: names the file, the line and what was expected."""


def _jsonl(path: Path, fields: tuple[str, ...] = (),
           check: Callable[[dict[str, Any]], str | None] | None = None) -> Iterator[dict[str, Any]]:
    """The file's JSON objects; each must have `fields`, and `check(record)` say no problem."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise BenchmarkFileError(f"{path}:{number}: not valid JSON ({error})") from None
            missing = [name for name in fields if not isinstance(record, dict) or name not in record]
            if missing:
                raise BenchmarkFileError(f"{path}:{number}: missing field {', '.join(map(repr, missing))}; "
                                         f"expected a JSON object with {', '.join(fields)}")
            problem = check(record) if check else None
            if problem:
                raise BenchmarkFileError(f"{path}:{number}: {problem}")
            yield record


def _items(task: str, records: Iterator[dict[str, Any]], text: Callable[[dict[str, Any]], str]) -> Iterator[BenchmarkItem]:
    for index, record in enumerate(records):
        yield BenchmarkItem(task, f"{task}/{index}", record, text(record))


def _arc_problem(raw: dict[str, Any]) -> str | None:
    choices, gold = raw["choices"], raw["gold"]
    if (isinstance(raw["query"], str) and isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) for c in choices) and type(gold) is int and 0 <= gold < len(choices)):
        return None
    count = len(choices) if isinstance(choices, list) else type(choices).__name__
    return (f"gold {gold!r} with {count} choices; expected query a string, choices a list of at least 2 "
            f"strings and gold an index into them")


def read_arc(path: Path, task: str) -> Iterator[BenchmarkItem]:
    def records():
        for raw in _jsonl(path, ("query", "choices", "gold"), _arc_problem):
            yield {"question": raw["query"].removeprefix("Question:").strip(), "choices": list(raw["choices"]),
                   "gold": raw["gold"]}
    return _items(task, records(), lambda r: " ".join([r["question"], *r["choices"]]))


SHAPE_FIELDS = {
    "arc": ("query", "choices", "gold"),
    "partial": ("context_options", "continuation", "gold"),
    "cloze": ("context", "continuation"),
    "generation": ("query", "answer"),
}
OPTIONS = {"arc": "choices", "partial": "context_options"}  # the field a gold index points into
LETTERS = "ABCDEFGHIJ"


def _gold_index(gold: Any, options: list[str], base: int) -> int | None:
    """An index into `options` from an int, a digit string, a letter (A, B, ...) or the right option's text."""
    if type(gold) is int or (isinstance(gold, str) and gold.strip().isdigit()):
        index = int(gold) - base
    elif isinstance(gold, str) and len(gold.strip()) == 1 and gold.strip() in LETTERS:
        index = LETTERS.index(gold.strip())
    elif isinstance(gold, str) and gold in options:
        index = options.index(gold)
    else:
        return None
    return index if 0 <= index < len(options) else None


def shape_record(raw: dict[str, Any], shape: str, fields: dict[str, str | list[str]],
                 gold_base: int = 0) -> dict[str, Any] | str:
    """One file record in a scoring shape's own field names, or what is wrong with it."""
    record = {name: raw[source] if isinstance(source, str) else [raw[s] for s in source]
              for name, source in fields.items()}
    options = OPTIONS.get(shape)
    if options:
        values = record[options]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return f"{fields[options]!r} is {type(values).__name__}; expected a list of strings"
        if len(values) < 2:
            return (f"{fields[options]!r} has {len(values)} option; a one-choice item is not multiple choice "
                    f"(it would always score 1.0): use layout cloze for a single continuation")
        index = _gold_index(record["gold"], values, gold_base)
        if index is None:
            return (f"gold {record['gold']!r} ({fields['gold']!r}) is not an index (from {gold_base}), a letter or "
                    f"the text of one of the {len(values)} options")
        record["gold"] = index
    for name in ("query", "context", "continuation"):
        if name in record and not isinstance(record[name], str):
            return f"{fields[name]!r} is {type(record[name]).__name__}; expected a string"
    if shape == "cloze" and not record["continuation"]:
        return f"{fields['continuation']!r} is empty"
    if "answer" in record:
        record["answer"] = str(record["answer"])
    return record


def read_shape(path: Path, task: str, shape: str, fields: dict[str, str | list[str]] | None = None,
               gold_base: int = 0) -> Iterator[BenchmarkItem]:
    """A jsonl file in one of `SHAPE_FIELDS`' shapes; `fields` renames (shape field -> file field)."""
    mapping = {name: (fields or {}).get(name, name) for name in SHAPE_FIELDS[shape]}
    needed = tuple(dict.fromkeys(f for source in mapping.values() for f in ([source] if isinstance(source, str) else source)))

    def problem(raw: dict[str, Any]) -> str | None:
        record = shape_record(raw, shape, mapping, gold_base)
        return record if isinstance(record, str) else None

    def records():
        for raw in _jsonl(path, needed, problem):
            record = shape_record(raw, shape, mapping, gold_base)
            if shape == "arc":
                record["question"] = record.pop("query").removeprefix("Question:").strip()
            yield record

    def text(record: dict[str, Any]) -> str:
        parts = [record.get(name) for name in ("question", "query", "context", "continuation", "answer")]
        return " ".join([*(p for p in parts if p), *record.get("choices", []), *record.get("context_options", [])])
    return _items(task, records(), text)


def read_hellaswag(path: Path, task: str = "hellaswag") -> Iterator[BenchmarkItem]:
    def records():
        with bz2.open(path, "rt", encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle]
        if len(lines) % 6:
            raise BenchmarkFileError(f"{path}: {len(lines)} lines; expected 6 per item (label: context, gold "
                                     f"index, 4 endings)")
        for start in range(0, len(lines) - 5, 6):
            header, gold, *endings = lines[start:start + 6]
            label, _, context = header.partition(": ")
            if gold.strip() not in ("0", "1", "2", "3"):
                raise BenchmarkFileError(f"{path}:{start + 2}: gold index {gold!r}; expected 0, 1, 2 or 3")
            yield {"activity_label": label, "context": context, "endings": endings, "gold": int(gold)}
    return _items(task, records(), lambda r: " ".join([r["context"], *r["endings"]]))


def read_mmlu(path: Path, task: str) -> Iterator[BenchmarkItem]:
    def records():
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.reader(handle)
            for row in rows:
                if len(row) != 6:
                    raise BenchmarkFileError(f"{path}:{rows.line_num}: {len(row)} columns; expected 6 (question, "
                                             f"A, B, C, D, answer letter)")
                if row[5].strip() not in MMLU_LETTERS:
                    raise BenchmarkFileError(f"{path}:{rows.line_num}: answer {row[5]!r}; expected one of A, B, C, D")
                yield {"question": row[0], "choices": row[1:5], "gold": MMLU_LETTERS.index(row[5].strip())}
    return _items(task, records(), lambda r: " ".join([r["question"], *r["choices"]]))


def read_truthfulqa(path: Path, task: str = "truthfulqa_mc") -> Iterator[BenchmarkItem]:
    def records():
        with open(path, encoding="utf-8") as handle:
            for raw in json.load(handle):
                yield {"question": raw["question"], "mc1_targets": raw["mc1_targets"], "mc2_targets": raw["mc2_targets"]}
    return _items(task, records(), lambda r: " ".join([r["question"], *r["mc2_targets"]]))


def read_gsm8k(path: Path, task: str = "gsm8k") -> Iterator[BenchmarkItem]:
    return _items(task, _jsonl(path, ("question", "answer")), lambda r: f"{r['question']} {r['answer']}")


def read_humaneval(path: Path, task: str = "humaneval") -> Iterator[BenchmarkItem]:
    return _items(task, _jsonl(path, ("task_id", "prompt", "canonical_solution", "test", "entry_point")),
                  lambda r: f"{r['prompt']}{r['canonical_solution']}")


def read_mt_bench(path: Path, task: str = "mt_bench") -> Iterator[BenchmarkItem]:
    return _items(task, _jsonl(path, ("question_id", "turns")), lambda r: " ".join(r["turns"]))


def benchmark_files(root: str | os.PathLike) -> dict[str, tuple[Path, Callable[..., Iterator[BenchmarkItem]]]]:
    """Task name -> (file, reader) for every benchmark file present under `root`."""
    base = Path(root)
    found: dict[str, tuple[Path, Callable[..., Iterator[BenchmarkItem]]]] = {}
    for name in ("easy", "challenge"):
        path = base / "arc" / "llm-foundry-icl" / f"arc_{name}_test.jsonl"
        if path.exists():
            found[f"arc_{name}"] = (path, read_arc)
    single = {
        "hellaswag": ("hellaswag/klosax-text/hellaswag_val_full.txt.bz2", read_hellaswag),
        "truthfulqa_mc": ("truthfulqa/data/mc_task.json", read_truthfulqa),
        "gsm8k": ("gsm8k/test.jsonl", read_gsm8k),
        "humaneval": ("humaneval/HumanEval.jsonl.gz", read_humaneval),
        "mt_bench": ("mt_bench/question.jsonl", read_mt_bench),
    }
    for task, (relative, reader) in single.items():
        if (base / relative).exists():
            found[task] = (base / relative, reader)
    for path in sorted((base / "mmlu" / "test").glob("*_test.csv")):
        found[f"mmlu_{path.name.removesuffix('_test.csv')}"] = (path, read_mmlu)
    return found


def mmlu_dev_file(root: str | os.PathLike, subject: str) -> Path:
    """The 5-shot pool of one MMLU subject."""
    return Path(root) / "mmlu" / "dev" / f"{subject}_dev.csv"


def iter_benchmark_items(root: str | os.PathLike, tasks: list[str] | None = None) -> Iterator[BenchmarkItem]:
    files = benchmark_files(root)
    if tasks is not None:
        unknown = sorted(set(tasks) - set(files))
        if unknown:
            raise ValueError(f"no benchmark files for {unknown} under {root}; found: {sorted(files)}")
    for task, (path, reader) in files.items():
        if tasks is None or task in tasks:
            yield from reader(path, task)

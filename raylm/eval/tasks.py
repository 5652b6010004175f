"""The benchmark suite from local files, through lm-eval's own task definitions.

Each lm-eval task keeps its prompts, few-shot handling and metrics: a generated task YAML
`include:`s the task's YAML from the installed lm-eval and only points the dataset at local files
(`dataset_path: json`, `dataset_kwargs.data_files`). Converters turn the layouts of the shared
benchmark folder (read by `raylm.data.benchmarks`) into the schema each task expects, and add a
`raylm_id` field (`<task>/<index>`, the ids of curation's contamination index) to every document,
so per-sample results can be split into clean and contaminated items.

Without a benchmark folder the standard lm-eval tasks are used unchanged (they download their data).

A new benchmark needs configuration only. `eval.extra_tasks: [{name, layout, path, ...}]`: in one of
the known multiple-choice layouts (arc jsonl, mmlu csv, hellaswag text) it reuses the lm-eval task of
its layout under the new name; in one of the other scoring shapes (`partial`: per-choice contexts,
WinoGrande's; `cloze`: a continuation's likelihood and greedy match, LAMBADA's; `generation`: exact
match of a regex-extracted answer, GSM8K's) it becomes an lm-eval task config built here, with
lm-eval's own request types, filters and metrics. `fields` maps the shape's field names to the
file's, so common jsonl variants load as they are. `eval.task_paths` adds any lm-eval task YAML
(file or folder) with its data in local files.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from raylm.data import benchmarks as bm

LETTERS = "ABCDEFGHIJ"
MMLU_SUBJECT_PREFIX = "mmlu_"


def lm_eval_task_dir() -> Path:
    # deferred: pulls in lm_eval, slow to import; only this path needs it
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


class EvalInputError(ValueError):
    """A task name, benchmark file or evaluation setting that cannot be used: one line naming it."""


# ---- converters: reader records -> the HF schema each lm-eval task reads -------------------------

def arc_doc(item: bm.BenchmarkItem) -> dict[str, Any]:
    r = item.record
    labels = list(LETTERS[:len(r["choices"])])
    return {"id": item.item_id, "question": r["question"], "choices": {"text": r["choices"], "label": labels},
            "answerKey": labels[r["gold"]], "raylm_id": item.item_id}


def hellaswag_doc(item: bm.BenchmarkItem) -> dict[str, Any]:
    r = item.record
    # The text layout has ctx_a and ctx_b already joined; lm-eval joins them with a space, so ctx_b is empty.
    return {"ind": item.item_id, "activity_label": r["activity_label"], "ctx_a": r["context"], "ctx_b": "",
            "ctx": r["context"], "endings": r["endings"], "source_id": "", "split": "validation",
            "split_type": "indomain", "label": str(r["gold"]), "raylm_id": item.item_id}


def mmlu_doc(item: bm.BenchmarkItem, subject: str) -> dict[str, Any]:
    r = item.record
    return {"question": r["question"], "subject": subject, "choices": r["choices"], "answer": r["gold"],
            "raylm_id": item.item_id}


def truthfulqa_doc(item: bm.BenchmarkItem) -> dict[str, Any]:
    r = item.record

    def targets(mapping: dict[str, int]) -> dict[str, list]:
        return {"choices": list(mapping), "labels": [int(v) for v in mapping.values()]}

    return {"question": r["question"], "mc1_targets": targets(r["mc1_targets"]),
            "mc2_targets": targets(r["mc2_targets"]), "raylm_id": item.item_id}


def gsm8k_doc(item: bm.BenchmarkItem) -> dict[str, Any]:
    return {"question": item.record["question"], "answer": item.record["answer"], "raylm_id": item.item_id}


def humaneval_doc(item: bm.BenchmarkItem) -> dict[str, Any]:
    r = item.record
    return {key: r[key] for key in ("task_id", "prompt", "canonical_solution", "test", "entry_point")} | {
        "raylm_id": item.item_id}


def _write_jsonl(path: Path, docs: Iterator[dict[str, Any]]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
    return count


def _write_yaml(path: Path, config: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config, handle, sort_keys=False, allow_unicode=True)


def _local(include: Path, task: str, data_files: dict[str, str], **overrides: Any) -> dict[str, Any]:
    return {"include": str(include), "task": task, "dataset_path": "json", "dataset_name": None,
            "dataset_kwargs": {"data_files": data_files}, **overrides}


# ---- configured benchmarks: every scoring shape, by configuration alone ----------------------------

SHAPE_LAYOUTS = ("partial", "cloze", "generation")
DEFAULT_PROMPT = "Question: {{query}}\nAnswer:"
DEFAULT_UNTIL = ["\n\n", "Question:"]
DEFAULT_ANSWER_PATTERN = r"#### (\-?[0-9\.\,]+)"  # lm-eval's gsm8k strict-match


@dataclass
class ExtraTask:
    """A benchmark added by configuration alone: a known layout (arc | mmlu | hellaswag) or a scoring
    shape (partial | cloze | generation) of a local file, turned into an lm-eval task config."""

    name: str
    layout: str  # arc | mmlu | hellaswag | partial | cloze | generation
    path: str
    fewshot_path: str | None = None
    description: str | None = None
    fields: dict[str, Any] | None = None  # shape field -> the file's field (or a list of fields)
    gold_base: int = 0  # gold indices in the file count from 0 or 1 (WinoGrande's answer "1" / "2")
    target_delimiter: str = " "  # between context and continuation (partial, cloze, choices)
    prompt: str | None = None  # generation: jinja template over query (default DEFAULT_PROMPT)
    answer_pattern: str | None = None  # generation: regex extracting the answer (default DEFAULT_ANSWER_PATTERN)
    until: list[str] | None = None  # generation: stop sequences (default DEFAULT_UNTIL)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "eval.extra_tasks") -> "ExtraTask":
        known = set(cls.__dataclass_fields__)
        raw = {k: v for k, v in raw.items() if v is not None}
        unknown = set(raw) - known
        if unknown:
            raise EvalInputError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
        missing = {"name", "layout", "path"} - set(raw)
        if missing:
            raise EvalInputError(f"{where}: missing keys {sorted(missing)} in {raw}")
        where = f"{where} ({raw['name']})"
        if raw["layout"] not in EXTRA_LAYOUTS:
            raise EvalInputError(f"{where}.layout: {raw['layout']!r} is not one of {sorted(EXTRA_LAYOUTS)}")
        for key in ("path", "fewshot_path"):
            if raw.get(key) and not Path(raw[key]).exists():
                raise EvalInputError(f"{where}.{key}: {raw[key]} does not exist")
        shape = raw["layout"]
        if raw.get("fields"):
            allowed = bm.SHAPE_FIELDS.get(shape, ())
            wrong = sorted(set(raw["fields"]) - set(allowed))
            if wrong:
                raise EvalInputError(f"{where}.fields: {wrong} not fields of layout {shape!r}"
                                     + (f" ({', '.join(allowed)})" if allowed else " (it has no field names)"))
        if shape != "generation":
            for key in ("prompt", "answer_pattern", "until"):
                if key in raw:
                    raise EvalInputError(f"{where}.{key}: only for layout generation, not {shape!r}")
        if raw.get("answer_pattern"):
            try:
                re.compile(raw["answer_pattern"])
            except re.error as error:
                raise EvalInputError(f"{where}.answer_pattern: {raw['answer_pattern']!r} is not a regular "
                                     f"expression ({error})") from None
        return cls(**raw)

    def items(self, path: str, suffix: str = "") -> Iterator[bm.BenchmarkItem]:
        """The file's items in this task's shape; a bad line is an error naming the task, file and line."""
        try:
            yield from bm.read_shape(Path(path), self.name + suffix, self.layout, self.fields, self.gold_base)
        except bm.BenchmarkFileError as error:
            raise EvalInputError(f"eval.extra_tasks ({self.name}): {error}") from None


def _shaped_data(task: ExtraTask, out: Path, doc: Callable[[bm.BenchmarkItem], dict[str, Any]]) -> dict[str, Any]:
    """The task's (and its few-shot file's) documents as jsonl; the dataset keys of its lm-eval config."""
    data = {"test": str(out / "data" / f"{task.name}.jsonl")}
    _write_jsonl(Path(data["test"]), (doc(i) for i in task.items(task.path)))
    config: dict[str, Any] = {"task": task.name, "dataset_path": "json", "dataset_name": None,
                              "dataset_kwargs": {"data_files": data}, "test_split": "test",
                              "target_delimiter": task.target_delimiter, "metadata": {"version": 1.0}}
    if task.fewshot_path:
        data["train"] = str(out / "data" / f"{task.name}.fewshot.jsonl")
        _write_jsonl(Path(data["train"]), (doc(i) for i in task.items(task.fewshot_path, ".fewshot")))
        config["training_split"] = "train"
    if task.description:
        config["description"] = task.description
    return config


def _record_doc(item: bm.BenchmarkItem) -> dict[str, Any]:
    return {**item.record, "raylm_id": item.item_id}


def _extra_partial(task: ExtraTask, out: Path) -> dict[str, Any]:
    """WinoGrande's shape: `doc_to_text` is the gold index, so lm-eval scores the one continuation
    after each context (its `multiple_input`) and picks the most likely context."""
    return _shaped_data(task, out, _record_doc) | {
        "output_type": "multiple_choice", "doc_to_text": "gold", "doc_to_target": "continuation",
        "doc_to_choice": "context_options",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def _extra_cloze(task: ExtraTask, out: Path) -> dict[str, Any]:
    """LAMBADA's shape: the continuation's log-likelihood after the context; `acc` is whether greedy
    decoding gives exactly the continuation, `perplexity` is exp of minus the mean log-likelihood."""
    def doc(item: bm.BenchmarkItem) -> dict[str, Any]:
        # lm-eval puts no delimiter between a loglikelihood task's context and target: it is the target's
        return {**item.record, "target": task.target_delimiter + item.record["continuation"], "raylm_id": item.item_id}

    return _shaped_data(task, out, doc) | {
        "output_type": "loglikelihood", "doc_to_text": "context", "doc_to_target": "target", "target_delimiter": "",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def _extra_generation(task: ExtraTask, out: Path) -> dict[str, Any]:
    """GSM8K's shape: greedy generation until a stop sequence, the answer extracted by `answer_pattern`
    (from the generation, and from the reference answer where it matches), then exact match."""
    pattern = task.answer_pattern or DEFAULT_ANSWER_PATTERN
    regex = re.compile(pattern)

    def doc(item: bm.BenchmarkItem) -> dict[str, Any]:
        found = regex.findall(item.record["answer"])
        gold = found[0] if found else item.record["answer"].strip()
        gold = next((g for g in gold if g), "") if isinstance(gold, tuple) else gold
        return {**item.record, "gold": gold, "raylm_id": item.item_id}

    return _shaped_data(task, out, doc) | {
        "output_type": "generate_until", "doc_to_text": task.prompt or DEFAULT_PROMPT, "doc_to_target": "gold",
        "generation_kwargs": {"until": list(task.until or DEFAULT_UNTIL), "do_sample": False},
        "filter_list": [{"name": "regex", "filter": [{"function": "regex", "regex_pattern": pattern},
                                                     {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "ignore_punctuation": False}]}


def _extra_arc(task: ExtraTask, out: Path) -> dict[str, Any]:
    def read(path: str, suffix: str = "") -> Iterator[bm.BenchmarkItem]:
        return task.items(path, suffix) if task.fields or task.gold_base else bm.read_arc(Path(path), task.name + suffix)

    data = {"test": str(out / "data" / f"{task.name}.jsonl")}
    _write_jsonl(Path(data["test"]), (arc_doc(i) for i in read(task.path)))
    overrides: dict[str, Any] = {"training_split": None, "validation_split": None, "test_split": "test"}
    if task.fewshot_path:
        data["train"] = str(out / "data" / f"{task.name}.fewshot.jsonl")
        _write_jsonl(Path(data["train"]), (arc_doc(i) for i in read(task.fewshot_path, ".fewshot")))
        overrides["training_split"] = "train"
    return _local(lm_eval_task_dir() / "arc" / "arc_easy.yaml", task.name, data, tag=[], **overrides)


def _extra_mmlu(task: ExtraTask, out: Path) -> dict[str, Any]:
    data = {"test": str(out / "data" / f"{task.name}.jsonl")}
    _write_jsonl(Path(data["test"]), (mmlu_doc(i, task.name) for i in bm.read_mmlu(Path(task.path), task.name)))
    overrides: dict[str, Any] = {"fewshot_split": None}
    if task.fewshot_path:
        data["dev"] = str(out / "data" / f"{task.name}.dev.jsonl")
        _write_jsonl(Path(data["dev"]), (mmlu_doc(i, task.name) for i in bm.read_mmlu(Path(task.fewshot_path), f"{task.name}.dev")))
        overrides["fewshot_split"] = "dev"
    if task.description:
        overrides["description"] = task.description
    return _local(lm_eval_task_dir() / "mmlu" / "default" / "_default_template_yaml", task.name, data, **overrides)


def _extra_hellaswag(task: ExtraTask, out: Path) -> dict[str, Any]:
    data = {"validation": str(out / "data" / f"{task.name}.jsonl")}
    _write_jsonl(Path(data["validation"]), (hellaswag_doc(i) for i in bm.read_hellaswag(Path(task.path), task.name)))
    return _local(lm_eval_task_dir() / "hellaswag" / "hellaswag.yaml", task.name, data, tag=[], training_split=None)


EXTRA_LAYOUTS: dict[str, Callable[[ExtraTask, Path], dict[str, Any]]] = {
    "arc": _extra_arc, "mmlu": _extra_mmlu, "hellaswag": _extra_hellaswag, "partial": _extra_partial,
    "cloze": _extra_cloze, "generation": _extra_generation}


# ---- any lm-eval task YAML, by path -------------------------------------------------------------

def _absolute_files(files: Any, folder: Path, where: str) -> Any:
    """`data_files` (a path, a list of them, or a split -> path(s) mapping) with relative paths made
    relative to the YAML's folder, each checked to exist."""
    if isinstance(files, dict):
        return {split: _absolute_files(value, folder, where) for split, value in files.items()}
    if isinstance(files, list):
        return [_absolute_files(value, folder, where) for value in files]
    if "://" in str(files):
        return files
    path = Path(files) if Path(files).is_absolute() else folder / files
    if not any(path.parent.glob(path.name)):
        raise EvalInputError(f"eval.task_paths: {where}: data file {files} not found (looked for {path})")
    return str(path)


def write_task_paths(paths: list[str], out: Path) -> dict[str, str]:
    """Register the lm-eval task (and group) YAMLs under `paths` (files or folders) for the local suite:
    each gets a YAML under `out` that `include:`s it, with its local `dataset_kwargs.data_files` made
    absolute (relative to the YAML's folder), so it runs from any working directory. Returns name -> YAML."""
    # deferred: pulls in lm_eval, slow to import; only this path needs it
    from lm_eval.tasks._yaml_loader import load_yaml

    names: dict[str, str] = {}
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise EvalInputError(f"eval.task_paths: {given} does not exist")
        files = sorted(root.rglob("*.yaml")) if root.is_dir() else [root]
        for number, path in enumerate(files):
            try:
                config = load_yaml(path, resolve_func=False)
            except Exception as error:  # noqa: BLE001 - yaml, include and tag errors alike: name the file
                raise EvalInputError(f"eval.task_paths: {path}: not a readable lm-eval task YAML "
                                     f"({type(error).__name__}: {str(error).splitlines()[0]})") from None
            name = config.get("group") if isinstance(config.get("group"), str) else config.get("task")
            if not isinstance(name, str):
                continue  # a template other YAMLs include
            wrapper: dict[str, Any] = {"include": str(path.resolve())}
            kwargs = config.get("dataset_kwargs") or {}
            if "group" not in config and kwargs.get("data_files") is not None:
                wrapper["dataset_kwargs"] = {**kwargs, "data_files": _absolute_files(
                    kwargs["data_files"], path.resolve().parent, str(path))}
            _write_yaml(out / "paths" / f"{len(names)}_{number}_{path.stem}.yaml", wrapper)
            names[name] = str(path)
    return names


def check_choices(task_manager: Any, names: dict[str, str]) -> None:
    """A multiple-choice task with fewer than two choices on some item scores 1.0 whatever the model:
    refused, naming the task, its YAML and the item."""
    try:
        loaded = task_manager.load(list(names))["tasks"]
    except Exception as error:  # noqa: BLE001 - a dataset that cannot be read, a bad template, ...: name the YAMLs
        first = (str(error).strip().splitlines() or [""])[0]
        raise EvalInputError(f"eval.task_paths: lm-eval could not load {', '.join(sorted(names))} "
                             f"({', '.join(sorted(set(names.values())))}): {type(error).__name__}: {first}") from None
    for task_name, task in loaded.items():
        if getattr(task, "OUTPUT_TYPE", None) != "multiple_choice":
            continue
        for index, doc in enumerate(task.eval_docs):
            count = len(task.doc_to_choice(doc))
            if count < 2:
                where = names.get(task_name) or next(iter(names.values()))
                raise EvalInputError(f"eval.task_paths: {where}: task {task_name!r}, item {index}: {count} choice; a "
                                     f"one-choice task is not multiple choice (it would always score 1.0): use "
                                     f"output_type loglikelihood")


# ---- the standard suite -----------------------------------------------------------------------------

@dataclass
class LocalSuite:
    """Task YAMLs and converted data under `root`, for `TaskManager(include_path=root)`."""

    root: Path
    tasks: list[str] = field(default_factory=list)  # lm-eval task (or group) names, ready to run
    source_task: dict[str, str] = field(default_factory=dict)  # lm-eval task -> benchmark reader task
    path_tasks: dict[str, str] = field(default_factory=dict)  # task or group from eval.task_paths -> its YAML

    def task_manager(self):
        # deferred: pulls in lm_eval, slow to import; only this path needs it
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=str(self.root), include_defaults=False)


SUITE_GROUPS = {
    "arc": ["arc_easy", "arc_challenge"],
    "truthfulqa": ["truthfulqa_mc1", "truthfulqa_mc2"],
    "standard": ["arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k",
                 "humaneval", "mt_bench"],
}
LM_EVAL_TASKS = {"arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc1", "truthfulqa_mc2", "gsm8k",
                 "humaneval"}


def expand_tasks(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for task in SUITE_GROUPS.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def _need(files: dict[str, Any], task: str, root: Path) -> Path:
    if task not in files:
        raise EvalInputError(f"--benchmark-data {root}: no file for {task!r} (see the shared data README "
                                f"for the expected layout)")
    return files[task][0]


def _head(items: Iterator[bm.BenchmarkItem], limit: int | None) -> Iterator[bm.BenchmarkItem]:
    for count, item in enumerate(items):
        if limit is not None and count >= limit:
            return
        yield item


def build_local_suite(benchmark_dir: str | os.PathLike, out_dir: str | os.PathLike, tasks: list[str],
                      extra_tasks: list[ExtraTask] = (), limit: int | None = None,
                      num_fewshot: int | None = None, task_paths: list[str] = ()) -> LocalSuite:
    """Convert the requested tasks' local files and write lm-eval task YAMLs that read them.

    `tasks` are lm-eval names (arc_easy, hellaswag, mmlu, mmlu_<subject>, truthfulqa_mc1, ...);
    raylm's own tasks (mt_bench, domain, bpb) are not lm-eval tasks and are skipped here; the tasks and
    groups of the lm-eval YAMLs under `task_paths` run as they are (`write_task_paths`).
    With a `limit` (lm-eval evaluates the first `limit` documents) only those are converted, unless
    few-shot examples are drawn from the same split (gsm8k, or any task with `num_fewshot` > 0 and
    no separate few-shot file), where the whole split is the pool.
    """
    head = limit if not num_fewshot else None
    root, out = Path(benchmark_dir), Path(out_dir)
    files = bm.benchmark_files(root)
    lm_tasks = lm_eval_task_dir()
    suite = LocalSuite(out)
    extras = {task.name: task for task in extra_tasks}
    suite.path_tasks = write_task_paths(list(task_paths), out) if task_paths else {}
    for task in tasks:
        if task in suite.path_tasks:
            suite.tasks.append(task)
        elif task in extras:
            _write_yaml(out / f"{task}.yaml", EXTRA_LAYOUTS[extras[task].layout](extras[task], out))
            suite.tasks.append(task)
            suite.source_task[task] = task
        elif task in ("arc_easy", "arc_challenge"):
            data = str(out / "data" / f"{task}.jsonl")
            _write_jsonl(Path(data), (arc_doc(i) for i in _head(bm.read_arc(_need(files, task, root), task), head)))
            _write_yaml(out / f"{task}.yaml", _local(lm_tasks / "arc" / f"{task}.yaml", task, {"test": data},
                                                     training_split=None, validation_split=None))
            suite.tasks.append(task)
            suite.source_task[task] = task
        elif task == "hellaswag":
            data = str(out / "data" / "hellaswag.jsonl")
            _write_jsonl(Path(data), (hellaswag_doc(i) for i in _head(bm.read_hellaswag(_need(files, task, root)), head)))
            _write_yaml(out / "hellaswag.yaml", _local(lm_tasks / "hellaswag" / "hellaswag.yaml", task,
                                                       {"validation": data}, training_split=None))
            suite.tasks.append(task)
            suite.source_task[task] = task
        elif task == "mmlu" or task.startswith(MMLU_SUBJECT_PREFIX):
            subjects = sorted(t for t in files if t.startswith(MMLU_SUBJECT_PREFIX)) if task == "mmlu" else [task]
            if not subjects:
                raise EvalInputError(f"--benchmark-data {root}: no MMLU subject files under {root / 'mmlu' / 'test'}")
            for subject_task in subjects:
                subject = subject_task.removeprefix(MMLU_SUBJECT_PREFIX)
                test = str(out / "data" / f"{subject_task}.jsonl")
                dev = str(out / "data" / f"{subject_task}.dev.jsonl")
                _write_jsonl(Path(test), (mmlu_doc(i, subject) for i in _head(bm.read_mmlu(_need(files, subject_task, root), subject_task), limit)))
                dev_file = bm.mmlu_dev_file(root, subject)
                data = {"test": test}
                if dev_file.exists():
                    _write_jsonl(Path(dev), (mmlu_doc(i, subject) for i in bm.read_mmlu(dev_file, f"{subject_task}.dev")))
                    data["dev"] = dev
                _write_yaml(out / "mmlu" / f"{subject_task}.yaml",
                            _local(lm_tasks / "mmlu" / "default" / f"{subject_task}.yaml", subject_task, data,
                                   **({} if dev_file.exists() else {"fewshot_split": None})))
                suite.source_task[subject_task] = subject_task
            if task == "mmlu":
                _write_yaml(out / "mmlu" / "_mmlu.yaml", {
                    "group": "mmlu", "task": subjects,
                    "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}})
            suite.tasks.append(task)
        elif task in ("truthfulqa_mc1", "truthfulqa_mc2"):
            data = str(out / "data" / "truthfulqa_mc.jsonl")
            if not Path(data).exists():
                _write_jsonl(Path(data), (truthfulqa_doc(i) for i in _head(bm.read_truthfulqa(_need(files, "truthfulqa_mc", root)), limit)))
            _write_yaml(out / f"{task}.yaml", _local(lm_tasks / "truthfulqa" / f"{task}.yaml", task,
                                                     {"validation": data}))
            suite.tasks.append(task)
            suite.source_task[task] = "truthfulqa_mc"
        elif task == "gsm8k":
            data = str(out / "data" / "gsm8k.jsonl")
            _write_jsonl(Path(data), (gsm8k_doc(i) for i in bm.read_gsm8k(_need(files, task, root))))
            # No train split offline: few-shot examples come from the test set, never the item itself.
            _write_yaml(out / "gsm8k.yaml", _local(lm_tasks / "gsm8k" / "gsm8k.yaml", task, {"test": data},
                                                   training_split=None, fewshot_split="test"))
            suite.tasks.append(task)
            suite.source_task[task] = task
        elif task == "humaneval":
            data = str(out / "data" / "humaneval.jsonl")
            _write_jsonl(Path(data), (humaneval_doc(i) for i in _head(bm.read_humaneval(_need(files, task, root)), limit)))
            _write_humaneval(out, {"test": data})
            suite.tasks.append(task)
            suite.source_task[task] = task
        elif task in ("mt_bench", "domain", "bpb"):
            continue
        else:
            raise EvalInputError(f"--tasks / eval.tasks: unknown task {task!r}; known: {sorted(LM_EVAL_TASKS | {'mt_bench', 'domain', 'bpb'})}, "
                             f"mmlu_<subject>, groups {sorted(SUITE_GROUPS)} or a name from eval.extra_tasks or eval.task_paths")
    return suite


def humaneval_task_config(data_kwargs: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's humaneval task with its metric run in raylm's sandbox instead of `evaluate`'s code_eval.

    The prompt, stop sequences and prediction filter are lm-eval's (humaneval.yaml); the built-in YAML
    cannot be included because its module loads `code_eval` from the Hugging Face hub on import.
    """
    with open(lm_eval_task_dir() / "humaneval" / "humaneval.yaml", encoding="utf-8") as handle:
        builtin = yaml.safe_load(handle.read().replace("!function ", ""))
    return {
        "task": "humaneval", "dataset_path": "json", "dataset_name": None, "dataset_kwargs": data_kwargs,
        "unsafe_code": True, "output_type": "generate_until", "test_split": "test",
        "doc_to_text": builtin["doc_to_text"], "doc_to_target": builtin["doc_to_target"],
        "metric_list": [{"metric": "__PASS_AT_K__", "aggregation": "mean", "higher_is_better": True, "k": [1]}],
        "generation_kwargs": builtin["generation_kwargs"], "repeats": builtin.get("repeats", 1), "num_fewshot": 0,
        "filter_list": [{"name": "create_test", "filter": [{"function": "custom", "filter_fn": "__BUILD__"}]}],
        "metadata": {"version": 1.0},
    }


def _write_humaneval(out: Path, data_files: dict[str, str]) -> None:
    config = humaneval_task_config({"data_files": data_files})
    text = yaml.safe_dump(config, sort_keys=False)
    text = text.replace("__PASS_AT_K__", "!function humaneval_sandbox.pass_at_k")
    text = text.replace("__BUILD__", "!function humaneval_sandbox.build_predictions")
    (out / "humaneval").mkdir(parents=True, exist_ok=True)
    (out / "humaneval" / "humaneval.yaml").write_text(text, encoding="utf-8")
    (out / "humaneval" / "humaneval_sandbox.py").write_text(
        '"""Generated by raylm: HumanEval metrics run in raylm\'s sandbox."""\n'
        "from raylm.eval.sandbox import build_predictions, pass_at_k  # noqa: F401\n", encoding="utf-8")

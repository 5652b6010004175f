"""The benchmark suite from local files, through lm-eval's own task definitions.

Each lm-eval task keeps its prompts, few-shot handling and metrics: a generated task YAML
`include:`s the task's YAML from the installed lm-eval and only points the dataset at local files
(`dataset_path: json`, `dataset_kwargs.data_files`). Converters turn the layouts of the shared
benchmark folder (read by `raylm.data.benchmarks`) into the schema each task expects, and add a
`raylm_id` field (`<task>/<index>`, the ids of curation's contamination index) to every document,
so per-sample results can be split into clean and contaminated items.

Without a benchmark folder the standard lm-eval tasks are used unchanged (they download their data).

A new multiple-choice benchmark in one of the known layouts (arc jsonl, mmlu csv, hellaswag text)
needs configuration only: `eval.extra_tasks: [{name, layout, path, fewshot_path}]`; it reuses the
lm-eval task of its layout under the new name.
"""

from __future__ import annotations

import json
import os
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


# ---- configured multiple-choice benchmarks ---------------------------------------------------------

@dataclass
class ExtraTask:
    """A multiple-choice benchmark in a known layout, added by configuration alone."""

    name: str
    layout: str  # arc | mmlu | hellaswag
    path: str
    fewshot_path: str | None = None
    description: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "eval.extra_tasks") -> "ExtraTask":
        known = {"name", "layout", "path", "fewshot_path", "description"}
        unknown = set(raw) - known
        if unknown:
            raise EvalInputError(f"{where}: unknown keys {sorted(unknown)}; expected {sorted(known)}")
        missing = {"name", "layout", "path"} - set(raw)
        if missing:
            raise EvalInputError(f"{where}: missing keys {sorted(missing)} in {raw}")
        if raw["layout"] not in EXTRA_LAYOUTS:
            raise EvalInputError(f"{where}.layout: {raw['layout']!r} is not one of {sorted(EXTRA_LAYOUTS)}")
        for key in ("path", "fewshot_path"):
            if raw.get(key) and not Path(raw[key]).exists():
                raise EvalInputError(f"{where}.{key}: {raw[key]} does not exist")
        return cls(**raw)


def _extra_arc(task: ExtraTask, out: Path) -> dict[str, Any]:
    data = {"test": str(out / "data" / f"{task.name}.jsonl")}
    _write_jsonl(Path(data["test"]), (arc_doc(i) for i in bm.read_arc(Path(task.path), task.name)))
    overrides: dict[str, Any] = {"training_split": None, "validation_split": None, "test_split": "test"}
    if task.fewshot_path:
        data["train"] = str(out / "data" / f"{task.name}.fewshot.jsonl")
        _write_jsonl(Path(data["train"]), (arc_doc(i) for i in bm.read_arc(Path(task.fewshot_path), f"{task.name}.fewshot")))
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
    "arc": _extra_arc, "mmlu": _extra_mmlu, "hellaswag": _extra_hellaswag}


# ---- the standard suite -----------------------------------------------------------------------------

@dataclass
class LocalSuite:
    """Task YAMLs and converted data under `root`, for `TaskManager(include_path=root)`."""

    root: Path
    tasks: list[str] = field(default_factory=list)  # lm-eval task (or group) names, ready to run
    source_task: dict[str, str] = field(default_factory=dict)  # lm-eval task -> benchmark reader task

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
                      num_fewshot: int | None = None) -> LocalSuite:
    """Convert the requested tasks' local files and write lm-eval task YAMLs that read them.

    `tasks` are lm-eval names (arc_easy, hellaswag, mmlu, mmlu_<subject>, truthfulqa_mc1, ...);
    raylm's own tasks (mt_bench, domain, bpb) are not lm-eval tasks and are skipped here.
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
    for task in tasks:
        if task in extras:
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
                             f"mmlu_<subject>, groups {sorted(SUITE_GROUPS)} or a name from eval.extra_tasks")
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

"""`raylm eval --checkpoint ...`: the benchmark suite, domain task, MT-Bench and bits-per-byte of one checkpoint.

One call evaluates a checkpoint on the requested tasks, on evaluation actors (or in this process),
and returns per-task metrics on all items and on clean items, the per-sample records, and a summary
table. `log_to_mlflow` writes them to an MLflow run linked to the run that produced the checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raylm import tracking
from raylm.eval.contamination import load_index, split_scores
from raylm.eval.domain import build_items, read_texts, write_domain_task
from raylm.eval.progress import LOGGER as PROGRESS_LOGGER
from raylm.eval.sandbox import (
    SandboxLimits,
    allow_code_execution,
    allow_weak_isolation,
    isolation_summary,
    require_code_execution,
    run_on_ray_resource,
)
from raylm.eval.tasks import (
    LM_EVAL_TASKS,
    SUITE_GROUPS,
    EvalInputError,
    ExtraTask,
    build_local_suite,
    check_choices,
    expand_tasks,
)
from raylm.failure import chatter_to_log

log = logging.getLogger("raylm")

RAYLM_TASKS = {"mt_bench", "domain", "bpb"}
# Groups whose members all ran get an aggregate row (the mean over all their items) above the members, as
# lm-eval's own MMLU group does; lm-eval only tags ARC and TruthfulQA.
AGGREGATED_GROUPS = ("arc", "truthfulqa")
MAIN_METRIC = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,flexible-extract",
               "pass_at_k,create_test")


@dataclass
class EvalSettings:
    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    actors: int = 1
    actor_gpus: float | str = "auto"
    actor_cpus: float = 1
    benchmark_data: str | None = None
    allow_code_execution: bool = False
    sandbox_timeout_s: float = 10.0
    sandbox_memory_mb: int = 1024
    sandbox_allow_weak: bool = False
    sandbox_ray_resource: str | None = None
    contamination_index: str | None = None
    domain_data: str | None = None
    domain_items: int = 200
    text_files: list[str] = field(default_factory=list)
    judge_url: str | None = None
    judge_model: str = "gpt-4"
    max_gen_toks: int = 256
    extra_tasks: list[dict[str, Any]] = field(default_factory=list)
    task_paths: list[str] = field(default_factory=list)  # lm-eval task YAMLs (files or folders)
    seed: int = 0
    gen_kwargs: dict[str, Any] | None = None  # overrides every generation task's own (e.g. max_gen_toks)

    @classmethod
    def from_config(cls, section: Any, **overrides: Any) -> "EvalSettings":
        known = set(cls.__dataclass_fields__)
        values = {k: v for k, v in section.model_dump().items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def metric_name(task: str, key: str, clean: bool = False) -> str:
    metric, _, filt = key.partition(",")
    name = f"{task}/{metric}" + (f".{filt}" if filt and filt != "none" else "")
    return name + (".clean" if clean else "")


def text_file_labels(paths: list[str], named: dict[str, str] | None = None) -> dict[str, str]:
    """Path -> the name its bits-per-byte is reported under (`bpb/<name>`): `named` paths keep their
    given name, the others their file name, or the path as given where file names repeat or clash."""
    named = dict(named or {})
    counts = Counter(Path(path).name for path in dict.fromkeys(paths) if path not in named)
    labels = {}
    for path in paths:
        name = Path(path).name
        labels[path] = named.get(path) or (name if counts[name] == 1 and name not in named.values() else path)
    return labels


def bits_per_byte_of_files(lm: Any, paths: list[str], named: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """`bpb/<label>` -> {"file": path, "bpb": bits per byte} for every text file (labels: `text_file_labels`)."""
    # deferred: pulls in lm_eval, slow to import; only this path needs it
    from lm_eval.api.instance import Instance

    out = {}
    for path, label in text_file_labels(paths, named).items():
        text = Path(path).read_text(encoding="utf-8")
        (logprob,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
        out[f"bpb/{label}"] = {"file": path, "bpb": -logprob / math.log(2) / max(1, len(text.encode("utf-8")))}
    return out


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def make_model(checkpoint: str, settings: EvalSettings, in_process: bool = False) -> Any:
    if in_process:
        # deferred: pulls in lm_eval, torch, slow to import; only this path needs it
        from raylm.eval.lm import RaylmLM

        return RaylmLM(checkpoint=checkpoint, batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks)
    # deferred: pulls in lm_eval, ray, slow to import; only this path needs it
    from raylm.eval.actors import ActorPoolLM

    return ActorPoolLM(checkpoint, actors=settings.actors, num_gpus=settings.actor_gpus, num_cpus=settings.actor_cpus,
                       batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks)


@dataclass
class PreparedTasks:
    """What `prepare_tasks` made ready: every input read and checked, no model loaded."""

    tasks: list[str]  # every requested task, groups expanded
    lm_tasks: list[str]  # what lm-eval runs
    task_manager: Any = None  # lm-eval's, over the local suite (None: lm-eval's standard tasks)
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> its tasks (mmlu)
    index: dict[str, set[str]] | None = None  # the contamination index
    isolation: str | None = None  # HumanEval's sandbox isolation level


def prepare_tasks(settings: EvalSettings, out_dir: str) -> PreparedTasks:
    """Everything before the model: task names, benchmark files converted (a bad file, line or field is an
    `EvalInputError` naming it), the sandbox, the contamination index, the text files. The CLI runs it
    before Ray starts, so a wrong input costs seconds."""
    out = Path(out_dir)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    tasks = expand_tasks(settings.tasks)
    for path in settings.text_files:
        if not Path(path).is_file():
            raise EvalInputError(f"--text-file / eval.text_files: {path} is not a file")
    if "mt_bench" in tasks and not settings.benchmark_data:
        raise EvalInputError("--benchmark-data / eval.benchmark_data: MT-Bench needs the local question file")
    if settings.benchmark_data and not Path(settings.benchmark_data).is_dir():
        raise EvalInputError(f"--benchmark-data / eval.benchmark_data: {settings.benchmark_data} is not a folder")
    if settings.contamination_index and not Path(settings.contamination_index).is_file():
        raise EvalInputError(f"--contamination-index / eval.contamination_index: {settings.contamination_index} "
                             f"is not a file")
    allow_code_execution(settings.allow_code_execution,
                         SandboxLimits(timeout_s=settings.sandbox_timeout_s, memory_mb=settings.sandbox_memory_mb))
    allow_weak_isolation(settings.sandbox_allow_weak)
    run_on_ray_resource(settings.sandbox_ray_resource)
    isolation = None
    if "humaneval" in tasks:
        require_code_execution("the humaneval task")
        isolation = isolation_summary()  # refuses here, before the model loads, where there is no fence
        log.info("eval: HumanEval sandbox isolation: %s", isolation)
    extras = [ExtraTask.from_dict(raw, f"eval.extra_tasks[{i}]") for i, raw in enumerate(settings.extra_tasks)]
    index = load_index(settings.contamination_index) if settings.contamination_index else None
    lm_tasks = [t for t in tasks if t not in RAYLM_TASKS]
    prepared = PreparedTasks(tasks=tasks, lm_tasks=lm_tasks, index=index, isolation=isolation)
    if settings.benchmark_data or "domain" in tasks or extras or settings.task_paths:
        suite = build_local_suite(settings.benchmark_data or ".", out / "tasks", lm_tasks, extras,
                                  settings.limit, settings.num_fewshot, settings.task_paths)
        local = {e.name for e in extras} | set(suite.path_tasks)
        if lm_tasks and not settings.benchmark_data and not all(t in local for t in lm_tasks):
            raise EvalInputError("--benchmark-data / eval.benchmark_data is needed to run standard tasks together "
                                 "with local ones")
        if "domain" in tasks:
            if not settings.domain_data:
                raise EvalInputError("eval.domain_data: the domain task needs held-out text (the curated val split)")
            items = build_items(read_texts(settings.domain_data), n_items=settings.domain_items, seed=settings.seed)
            suite.tasks.append(write_domain_task(items, out / "tasks"))
        prepared.lm_tasks = suite.tasks
        prepared.task_manager = suite.task_manager()
        used = {name: path for name, path in suite.path_tasks.items() if name in suite.tasks}
        if used:
            with chatter_to_log(PROGRESS_LOGGER):  # lm-eval loads the tasks: its chatter goes to the run log
                check_choices(prepared.task_manager, used)
        if "mmlu" in suite.tasks:
            prepared.groups["mmlu"] = sorted(t for t in suite.source_task if t.startswith("mmlu_"))
        for group in AGGREGATED_GROUPS:  # lm-eval tags these, without an aggregate: raylm pools their items
            if all(member in suite.tasks for member in SUITE_GROUPS[group]):
                prepared.groups[group] = list(SUITE_GROUPS[group])
    elif any(t not in LM_EVAL_TASKS for t in lm_tasks):  # lm-eval's own registry (downloads its data)
        # deferred: pulls in lm_eval, slow to import; only this path needs it
        from lm_eval.tasks import TaskManager

        prepared.task_manager = TaskManager()
        unknown = [t for t in lm_tasks if t not in prepared.task_manager.all_tasks]
        if unknown:
            raise EvalInputError(f"--tasks / eval.tasks: unknown task {unknown[0]!r}: neither raylm's "
                                 f"({', '.join(sorted(LM_EVAL_TASKS | RAYLM_TASKS))}, groups "
                                 f"{', '.join(sorted(SUITE_GROUPS))}) nor one of lm-eval's")
    return prepared


def evaluate_checkpoint(checkpoint: str, settings: EvalSettings, out_dir: str, lm: Any = None,
                        in_process: bool = False, text_names: dict[str, str] | None = None,
                        prepared: PreparedTasks | None = None) -> dict[str, Any]:
    """Run every requested task; write per-sample jsonl files under `out_dir`; return the results.
    `text_names`: path -> name for text files whose bits-per-byte is reported under a chosen name;
    `prepared`: `prepare_tasks`' result for these settings and `out_dir` (made here when None)."""
    # deferred: pulls in lm_eval, slow to import; only this path needs it
    import lm_eval

    prepared = prepared or prepare_tasks(settings, out_dir)
    tasks, lm_tasks, task_manager, groups, index = (prepared.tasks, prepared.lm_tasks, prepared.task_manager,
                                                    prepared.groups, prepared.index)
    out = Path(out_dir)
    started = time.perf_counter()
    with chatter_to_log(PROGRESS_LOGGER):  # the actors' start-up warnings, like lm-eval's, to the run log
        lm = lm if lm is not None else make_model(checkpoint, settings, in_process)
    long_items = getattr(lm, "long_items", None)  # raylm's models count over-long items per task
    if long_items is not None:
        long_items.clear()
    results: dict[str, Any] = {"checkpoint": checkpoint, "tasks": {}, "metrics": {}, "files": {}}
    if prepared.isolation:
        results["sandbox_isolation"] = prepared.isolation

    if lm_tasks:
        with chatter_to_log(PROGRESS_LOGGER):  # unless --verbose, lm-eval's chatter goes to the run log
            evaluated = lm_eval.simple_evaluate(
                model=lm, tasks=lm_tasks, task_manager=task_manager, limit=settings.limit, num_fewshot=settings.num_fewshot,
                log_samples=True, confirm_run_unsafe_code=settings.allow_code_execution, bootstrap_iters=0,
                gen_kwargs=settings.gen_kwargs,
                random_seed=settings.seed, numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
                fewshot_random_seed=settings.seed)
        samples = evaluated.get("samples", {})
        for task, samples_of_task in samples.items():
            path = out / "samples" / f"{task}.jsonl"
            with open(path, "w", encoding="utf-8") as handle:
                for sample in samples_of_task:
                    handle.write(json.dumps(sample, default=_json_default, ensure_ascii=False) + "\n")
            results["files"][task] = str(path)
        groups = {**{g: list(m) for g, m in (evaluated.get("group_subtasks") or {}).items() if m}, **groups}
        results["groups"] = groups
        for group, members in groups.items():
            samples[group] = [s for m in members for s in samples.get(m, [])]
        for task in [*evaluated["results"], *(group for group in groups if group not in evaluated["results"])]:
            reported = {k: v for k, v in evaluated["results"].get(task, {}).items()
                        if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
            split = split_scores(samples.get(task, []), index)
            entry = {"reported": reported, "n_items": split["n_items"], "n_clean": split["n_clean"],
                     "n_contaminated": split["n_contaminated"], "all": {}, "clean": {}}
            for key, value in split["metrics"].items():
                entry["all"][key], entry["clean"][key] = value["all"], value["clean"]
            if not split["metrics"]:  # a group without samples of its own: lm-eval's aggregate
                entry["all"] = dict(reported)
            if long_items is not None:
                for kind in ("truncated", "windowed"):
                    entry[kind] = sum(len(long_items.get(t, {}).get(kind, ())) for t in groups.get(task, [task]))
            results["tasks"][task] = entry
    if "mt_bench" in tasks:
        # deferred: pulls in lm_eval, slow to import; only this path needs it
        from raylm.eval.mtbench import run_mt_bench

        summary = run_mt_bench(lm, settings.benchmark_data, str(out / "samples" / "mt_bench.jsonl"), settings.limit,
                               settings.judge_url, settings.judge_model, settings.max_gen_toks)
        results["files"]["mt_bench"] = summary["answers"]
        results["tasks"]["mt_bench"] = {"n_items": summary["n_items"], "scored": summary["scored"],
                                        "note": summary.get("note"),
                                        "all": {"score,none": summary["score"]} if summary["scored"] else {},
                                        "clean": {}}
    if settings.text_files:
        results["bpb"] = bits_per_byte_of_files(lm, settings.text_files, text_names)
        results["metrics"].update({key: value["bpb"] for key, value in results["bpb"].items()})
    for task, entry in results["tasks"].items():
        for key, value in entry["all"].items():
            results["metrics"][metric_name(task, key)] = value
        if index is not None:
            for key, value in entry["clean"].items():
                results["metrics"][metric_name(task, key, clean=True)] = value
            if entry.get("n_contaminated") is not None:
                results["metrics"][f"{task}/n_contaminated"] = entry["n_contaminated"]
        results["metrics"][f"{task}/n_items"] = entry.get("n_items", 0)
        for kind in ("truncated", "windowed"):
            if kind in entry:
                results["metrics"][f"{task}/{kind}"] = entry[kind]
    results["summary"] = summary_rows(results, index is not None)
    results["metrics"]["eval_seconds"] = time.perf_counter() - started
    if hasattr(lm, "shutdown"):
        lm.shutdown()
    return results


def main_metric(entry: dict[str, Any]) -> str | None:
    for key in MAIN_METRIC:
        if key in entry.get("all", {}):
            return key
    return next(iter(entry.get("all", {})), None)


def summary_order(results: dict[str, Any]) -> list[str]:
    """Tasks and group aggregates first (MMLU, ARC, TruthfulQA, ...), then each group's members (subjects)."""
    members = [m for group in results.get("groups", {}).values() for m in group if m in results["tasks"]]
    return [t for t in results["tasks"] if t not in members] + list(dict.fromkeys(members))


def subject_rows(results: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The summary's rows split into (tasks and group aggregates, group members)."""
    members = {m for group in results.get("groups", {}).values() for m in group}
    return ([r for r in results["summary"] if r["task"] not in members],
            [r for r in results["summary"] if r["task"] in members])


def summary_rows(results: dict[str, Any], with_index: bool) -> list[dict[str, Any]]:
    rows = []
    for task in summary_order(results):
        entry = results["tasks"][task]
        key = main_metric(entry)
        row = {"task": task, "metric": key.replace(",none", "") if key else "", "n_items": entry.get("n_items", 0),
               "score": entry["all"].get(key) if key else None}
        if with_index:
            row.update(clean=entry["clean"].get(key) if key else None, n_clean=entry.get("n_clean"))
        if "truncated" in entry:  # items cut to the model's context length (see raylm/eval/lm.py)
            row.update(truncated=entry["truncated"], windowed=entry["windowed"])
        if task == "mt_bench" and not entry.get("scored"):
            row["metric"], row["score"] = "UNSCORED (no judge configured)", None
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else (
            f"{value:.4f}" if isinstance(value, float) else str(value))

    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def summary_text(results: dict[str, Any]) -> str:
    """The summary table (tasks and group aggregates, then each group's members), bits-per-byte, and the
    HumanEval sandbox's isolation level where HumanEval ran."""
    top, members = subject_rows(results)
    table = format_table(top) if top else ""
    for group, names in results.get("groups", {}).items():
        rows = [r for r in members if r["task"] in names]
        if rows:
            table += f"\n\n### {group}: {len(rows)} subtasks\n\n" + format_table(rows)
    table = table.strip("\n")
    if results.get("bpb"):
        table += "\n\n" + "\n".join(f"{key}: {value['bpb']:.4f} bits per byte of {value['file']}"
                                     for key, value in results["bpb"].items())
    if results.get("sandbox_isolation"):
        table += f"\n\nHumanEval sandbox isolation: {results['sandbox_isolation']}"
    return table


def score_charts(results: dict[str, Any], out_dir: str) -> list[str]:
    """`scores.png`: one bar per task or group aggregate (clean items beside all items where an index
    was given); `scores_subtasks.png`: the groups' members (MMLU's subjects)."""
    top, members = subject_rows(results)
    charts = [bar_chart(top, os.path.join(out_dir, "scores.png"), "tasks and group aggregates"),
              bar_chart(members, os.path.join(out_dir, "scores_subtasks.png"), "subtasks of the groups")]
    return [chart for chart in charts if chart]


def bar_chart(rows: list[dict[str, Any]], path: str, title: str | None = None) -> str | None:
    scored = [r for r in rows if isinstance(r.get("score"), (int, float))]
    if not scored:
        return None
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 * len(scored) + 1.5))
    names = [f"{r['task']} ({r['metric']})" for r in scored]
    y = range(len(scored))
    ax.barh([i + 0.2 for i in y], [r["score"] for r in scored], height=0.4, label="all items")
    if any("clean" in r for r in scored):
        ax.barh([i - 0.2 for i in y], [r.get("clean") or 0 for r in scored], height=0.4, label="clean items")
    ax.set_yticks(list(y), names)
    ax.invert_yaxis()  # the summary's order, top to bottom
    ax.set_xlabel("score")
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def resolve_checkpoint(reference: str, client: Any) -> tuple[str, str | None]:
    """A checkpoint path or URI, or an MLflow run id whose run holds one -> (checkpoint, producing run id)."""
    if os.path.exists(reference) or "://" in reference:
        runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`raylm.checkpoint` = '{reference}' and "
                                                "tags.`raylm.stage` != 'eval'",  # the run that made it, not an eval of it
                                  max_results=1)
        return reference, (runs[0].info.run_id if runs else None)
    try:
        run = client.get_run(reference)
    except Exception as error:  # noqa: BLE001 - MLflow raises several kinds for an unknown id
        raise EvalInputError(f"--checkpoint {reference}: neither an existing path nor an MLflow run id "
                             f"({type(error).__name__})") from None
    checkpoint = run.data.tags.get("raylm.checkpoint")
    if not checkpoint:
        raise EvalInputError(f"--checkpoint {reference}: MLflow run {reference} has no raylm.checkpoint tag "
                             f"(not a training run?)")
    return checkpoint, reference


def log_to_mlflow(results: dict[str, Any], settings: EvalSettings, tracker: Any, source_run: str | None,
                  out_dir: str) -> str:
    tags = {"raylm.stage": "eval", "raylm.checkpoint": results["checkpoint"]}
    nested = tracking.in_run()  # inside `raylm pipeline`: a child of the pipeline's run
    if source_run:
        tags["raylm.source_run"] = source_run
        if not nested:  # on its own: shown under the run that made the checkpoint
            tags["mlflow.parentRunId"] = source_run
    params = {f"eval.{k}": v for k, v in settings.__dict__.items()}
    if results.get("sandbox_isolation"):
        tags["raylm.sandbox_isolation"] = results["sandbox_isolation"].split()[0]
        params["eval.sandbox_isolation"] = results["sandbox_isolation"]
    with tracker.run("eval", params=params, tags=tags, nested=nested) as run:
        tracker.log_metrics(results["metrics"])
        for task, path in results["files"].items():
            tracking.log_artifact(path, "samples")
        table = summary_text(results)
        tracking.log_text(table + "\n", "summary.md")
        tracking.log_table({k: [r.get(k) for r in results["summary"]] for k in
                            dict.fromkeys(k for r in results["summary"] for k in r)}, "summary.json")
        for chart in score_charts(results, out_dir):
            tracking.log_artifact(chart)
        tracking.log_dict({k: v for k, v in results.items() if k != "files"}, "results.json")
        return run.info.run_id

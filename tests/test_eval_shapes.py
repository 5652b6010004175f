"""Every scoring shape a user adds by configuration alone (issue 21): per-choice contexts (WinoGrande),
cloze (LAMBADA), generation with a regex-extracted answer (GSM8K), renamed fields (PIQA's layout) and an
lm-eval task YAML by path, through the real lm-eval, each with an item longer than the context; and the
inputs refused before any model loads."""

from __future__ import annotations

import json
import math

import pytest

from eval_helpers import make_checkpoint, write_shapes
from raylm.eval.suite import EvalSettings, evaluate_checkpoint, prepare_tasks
from raylm.eval.tasks import EvalInputError


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_every_scoring_shape_by_configuration(tmp_path):
    from raylm.eval.lm import RaylmLM

    checkpoint = make_checkpoint(tmp_path / "ckpt", seq_len=96)
    extra, paths, names = write_shapes(tmp_path / "data")
    settings = EvalSettings(tasks=names, extra_tasks=extra, task_paths=paths, gen_kwargs={"max_gen_toks": 8})
    results = evaluate_checkpoint(str(checkpoint), settings, str(tmp_path / "out"),
                                  lm=RaylmLM(checkpoint=str(checkpoint), batch_size=4))
    tasks = results["tasks"]
    assert {task: tasks[task]["n_items"] for task in names} == dict.fromkeys(names, 3)
    for task in names:  # the long item, left-truncated, not fatal
        assert tasks[task]["truncated"] == 1, task
    piqa, wino, lambada, gsm, yes_no = (_rows(results["files"][task]) for task in names)
    # fields: PIQA's goal / sol1, sol2 / label read as query / choices / gold
    doc = piqa[2]["doc"]
    assert doc["question"] == "Ice melts" and doc["choices"]["text"] == ["when it gets warm.", "when the cat sits."]
    assert doc["answerKey"] == "B"
    # partial: one continuation scored after each context; gold "1" counts from 1
    assert [a[1] for a in wino[0]["arguments"]] == [" was warm.", " was warm."]
    assert [a[0] for a in wino[0]["arguments"]] == wino[0]["doc"]["context_options"] and wino[0]["doc"]["gold"] == 0
    # cloze: greedy accuracy and perplexity of the continuation, as lm-eval aggregates them
    assert lambada[0]["arguments"][0] == ["The cat sat on the", " mat"]
    assert set(tasks["my_lambada"]["all"]) == {"perplexity,none", "acc,none"}
    lls = [row["resps"][0][0][0] for row in lambada]
    assert tasks["my_lambada"]["all"]["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / 3))
    assert tasks["my_lambada"]["all"] == pytest.approx(tasks["my_lambada"]["reported"])
    # generation: the reference answer extracted by the configured pattern, the prediction by the same
    assert [row["target"] for row in gsm] == ["42", "100", "5"]
    assert gsm[0]["arguments"][0][0] == "Question: What is 40 plus 2?\nAnswer:"
    assert tasks["my_gsm"]["all"] == pytest.approx(tasks["my_gsm"]["reported"]) and "exact_match,regex" in tasks["my_gsm"]["all"]
    # a task YAML by path, its data file relative to it
    assert yes_no[1]["doc"]["label"] == 1 and len(yes_no[1]["arguments"]) == 2
    table = results["summary"]
    assert [row["task"] for row in table] == names


def _refused(tmp_path, **settings):
    with pytest.raises(EvalInputError) as error:
        prepare_tasks(EvalSettings(**settings), str(tmp_path / "out"))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_shapes_refused_before_any_model(tmp_path):
    """One line naming the task, key, file and line: no model loaded, no Ray."""
    one_choice = tmp_path / "one.jsonl"
    one_choice.write_text('{"query": "Q?", "choices": ["a", "b"], "gold": 0}\n{"q": "Q?", "opts": ["only"], "g": 0}\n')
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"q": "Q?", "opts": ["a", "b"], "g": 0}\n')
    fields = {"query": "q", "choices": "opts", "gold": "g"}
    message = _refused(tmp_path, tasks=["quiz"], extra_tasks=[
        {"name": "quiz", "layout": "arc", "path": str(one_choice), "fields": fields}])
    assert "quiz" in message and "one.jsonl:1" in message  # line 1 lacks the renamed fields
    one_choice.write_text('{"q": "Q?", "opts": ["a", "b"], "g": 0}\n{"q": "Q?", "opts": ["only"], "g": 0}\n')
    message = _refused(tmp_path, tasks=["quiz"], extra_tasks=[
        {"name": "quiz", "layout": "arc", "path": str(one_choice), "fields": fields}])
    assert "quiz" in message and "one.jsonl:2" in message and "one-choice" in message
    assert "rows.jsonl:1: gold 0 ('g') is not an index (from 1)" in _refused(tmp_path, tasks=["quiz"], extra_tasks=[
        {"name": "quiz", "layout": "partial", "path": str(rows), "gold_base": 1,
         "fields": {"context_options": "opts", "continuation": "q", "gold": "g"}}])
    assert "answer_pattern" in _refused(tmp_path, tasks=["quiz"], extra_tasks=[
        {"name": "quiz", "layout": "generation", "path": str(rows), "answer_pattern": "(unclosed"}])
    assert "fields: ['choices']" in _refused(tmp_path, tasks=["quiz"], extra_tasks=[
        {"name": "quiz", "layout": "cloze", "path": str(rows), "fields": {"choices": "opts"}}])
    # a task YAML by path: its data file missing; a multiple-choice task with one choice
    yaml_dir = tmp_path / "yaml"
    yaml_dir.mkdir()
    task = ("task: solo\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {file}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: '{{{{opts}}}}'\ndoc_to_target: g\n"
            "metric_list:\n  - metric: acc\n")
    (yaml_dir / "solo.yaml").write_text(task.format(file="nope.jsonl"))
    message = _refused(tmp_path, tasks=["solo"], task_paths=[str(yaml_dir)])
    assert "solo.yaml" in message and "nope.jsonl" in message
    (yaml_dir / "solo.yaml").write_text(task.format(file="../one.jsonl").replace("json\n", "no_such_loader\n", 1))
    message = _refused(tmp_path, tasks=["solo"], task_paths=[str(yaml_dir)])
    assert "could not load solo" in message and "solo.yaml" in message
    (yaml_dir / "solo.yaml").write_text(task.format(file="../one.jsonl"))
    message = _refused(tmp_path, tasks=["solo"], task_paths=[str(yaml_dir)])
    assert "solo.yaml" in message and "'solo', item 1: 1 choice" in message


def test_summary_puts_aggregates_first_and_draws_subjects_apart(tmp_path):
    """Issue 21: summary.md leads with tasks and group aggregates, then each group's subtasks;
    scores.png has one bar per task or group (clean beside all), scores_subtasks.png the subjects."""
    from raylm.eval.suite import score_charts, summary_rows, summary_text

    def entry(score):
        return {"all": {"acc,none": score}, "clean": {"acc,none": score / 2}, "n_items": 4, "n_clean": 2}

    tasks = {"mmlu_anatomy": entry(0.25), "mmlu_virology": entry(0.5), "arc_easy": entry(0.75), "mmlu": entry(0.375),
             "truthfulqa_mc2": entry(0.4)}
    results = {"tasks": tasks, "groups": {"mmlu": ["mmlu_anatomy", "mmlu_virology"]}}
    results["summary"] = summary_rows(results, with_index=True)
    assert [row["task"] for row in results["summary"]] == ["arc_easy", "mmlu", "truthfulqa_mc2", "mmlu_anatomy",
                                                          "mmlu_virology"]
    text = summary_text(results)
    top, subjects = text.split("### mmlu: 2 subtasks")
    assert "| arc_easy |" in top and "| mmlu |" in top and "mmlu_anatomy" not in top
    assert "| mmlu_anatomy |" in subjects and "| mmlu_virology |" in subjects
    charts = score_charts(results, str(tmp_path))
    assert [c.rsplit("/", 1)[1] for c in charts] == ["scores.png", "scores_subtasks.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in ("scores.png", "scores_subtasks.png"))
    without_groups = {"tasks": {"arc_easy": entry(0.75)}}
    without_groups["summary"] = summary_rows(without_groups, with_index=False)
    (tmp_path / "plain").mkdir()
    assert [c.rsplit("/", 1)[1] for c in score_charts(without_groups, str(tmp_path / "plain"))] == ["scores.png"]


def test_lm_eval_chatter_goes_to_the_run_log_and_progress_to_the_console(tmp_path, capfd):
    """Issue 21: without --verbose, what lm-eval and its subprocesses write to stderr lands in the run log;
    the progress lines (tasks, request counts) still reach the console."""
    import os
    import subprocess

    from raylm import failure
    from raylm.eval.progress import Progress

    class Request:
        def __init__(self, task):
            self.task_name = task

    path = failure.open_run_log(str(tmp_path), "eval", verbose=False)
    try:
        with failure.chatter_to_log("raylm.progress"):
            os.write(2, b"Building contexts for arc_easy on rank 0...\n")  # how a library's bars and handlers write
            subprocess.run(["sh", "-c", "echo 'fatal: not a git repository' >&2"], check=True)
            progress = Progress("loglikelihood", [Request("arc_easy")] * 3 + [Request("mmlu_anatomy")])
            progress.finish()
    finally:
        failure.close_run_log()
    console = capfd.readouterr().err
    assert "eval: loglikelihood: 4 requests (arc_easy 3, mmlu_anatomy 1)" in console
    assert "fatal" not in console and "Building contexts" not in console
    logged = open(path).read()
    assert "fatal: not a git repository" in logged and "Building contexts" in logged and "4 requests" in logged

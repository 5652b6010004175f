"""`raylm eval --checkpoint ...` end to end: results in the workspace and in an MLflow run."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from eval_helpers import make_checkpoint, write_long_quiz, write_shapes
from raylm.cli import main


@pytest.mark.slow
def test_eval_command_logs_tasks_to_mlflow(shared_data, ray_session, workspace_dir, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", seq_len=64)
    text = tmp_path / "notes.txt"
    text.write_text("The cat sat on the mat. Water boils at 100 degrees.\n" * 5)
    index = tmp_path / "index.json"
    index.write_text('{"ngram": 13, "contaminated_documents": 1, "tasks": {"arc_easy": ["arc_easy/1"]}}')
    quiz = write_long_quiz(tmp_path / "long_quiz.jsonl")  # items longer than the context: issue 21
    extra, paths, shapes = write_shapes(tmp_path / "shapes")  # every scoring shape, by configuration alone
    model = register_checkpoint(str(checkpoint), str(workspace_dir))  # issue 27: evaluated by its models:/ URI
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"eval": {"extra_tasks": [{"name": "long_quiz", "layout": "arc", "path": str(quiz)},
                                                               *extra], "task_paths": paths, "max_gen_toks": 8}}))
    code = main(["eval", "--config", str(config), "--workspace", str(workspace_dir), "--checkpoint", model.uri,
                 "--tasks", ",".join(["arc_easy", "long_quiz", *shapes]), "--limit", "3", "--benchmark-data",
                 str(shared_data / "benchmarks"), "--contamination-index", str(index), "--text-file", str(text),
                 "--set", "eval.batch_size=4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "MLflow run" in printed
    client = MlflowClient(f"sqlite:///{workspace_dir / 'mlflow.db'}")
    run_id = printed.rsplit("MLflow run: ", 1)[1].split()[0]
    run = client.get_run(run_id)
    metrics = run.data.metrics
    assert {"arc_easy/acc", "arc_easy/acc_norm", "arc_easy/acc.clean", "bpb/notes.txt"} <= set(metrics)
    assert metrics["arc_easy/n_contaminated"] == 1
    assert (metrics["long_quiz/n_items"], metrics["long_quiz/truncated"], metrics["long_quiz/windowed"]) == (3, 2, 1)
    assert "arc_easy/truncated" in metrics
    assert {f"{task}/n_items" for task in shapes} <= set(metrics) and "my_lambada/perplexity" in metrics
    (log_file,) = (workspace_dir / "logs").glob("eval-*.log")  # progress by request type, in the run log too
    assert "eval: loglikelihood: " in log_file.read_text() and "my_wino 6" in log_file.read_text()
    assert all(metrics[f"{task}/truncated"] == 1 for task in shapes)
    summary = open(client.download_artifacts(run_id, "summary.md", str(tmp_path))).read()
    assert "truncated" in summary.splitlines()[0] and "bpb/notes.txt: " in summary and str(text) in summary
    assert run.data.tags["raylm.checkpoint"] == str(checkpoint)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"summary.md", "results.json", "scores.png", "samples/arc_easy.jsonl"} <= artifacts
    on_model = {m.key: m for m in client.get_logged_model(model.model_id).metrics}
    assert on_model["arc_easy/acc"].value == metrics["arc_easy/acc"] and on_model["arc_easy/acc"].run_id == run_id
    assert run.data.tags["raylm.source_run"] == client.get_model_version("raylm", model.version).run_id


def register_checkpoint(checkpoint: str, workspace: str):
    """The checkpoint as version 1 of model `raylm` in the workspace's store, logged by a `pretrain` run."""
    from raylm import registry
    from raylm.config import TrackingConfig
    from raylm.tracking import Tracker
    from raylm.workspace import Workspace

    tracker = Tracker(TrackingConfig(), Workspace(workspace))
    with tracker.run("pretrain", tags={"raylm.checkpoint": checkpoint}):
        return registry.log_checkpoint_model(checkpoint, TrackingConfig(), "pretrain")


ARC_ROW = {"query": "Question: Which gas do plants take in?", "choices": ["carbon dioxide", "oxygen"], "gold": 0}


def _bad_inputs(tmp_path):
    """Each case: (arguments after `raylm`, what the one line must name). Inputs a stranger gets wrong."""
    import json

    checkpoint = str(make_checkpoint(tmp_path / "ckpt", seq_len=32))
    rows = {"missing_field": [ARC_ROW, {k: v for k, v in ARC_ROW.items() if k != "gold"}],
            "bad_json": [ARC_ROW, '{"query": "x",']}
    configs = {}
    for name, lines in rows.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(f"eval:\n  extra_tasks: [{{name: quiz, layout: arc, path: {path}}}]\n")
    one_choice = tmp_path / "one_choice.jsonl"  # a cloze task in disguise: would score 1.0 as multiple choice
    one_choice.write_text(json.dumps({"goal": "Q?", "sols": ["only"], "label": 0}) + "\n")
    configs["one_choice"] = tmp_path / "one_choice.yaml"
    configs["one_choice"].write_text(f"eval:\n  extra_tasks: [{{name: quiz, layout: arc, path: {one_choice}, "
                                     f"fields: {{query: goal, choices: sols, gold: label}}}}]\n")
    csv_file = tmp_path / "quiz.csv"
    csv_file.write_text("q,a,b,c,d,A\nq2,a,b,c,D\n")
    configs["columns"] = tmp_path / "columns.yaml"
    configs["columns"].write_text(f"eval:\n  extra_tasks: [{{name: quiz, layout: mmlu, path: {csv_file}}}]\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    quiz = ["--checkpoint", checkpoint, "--tasks", "quiz"]
    return {
        "missing checkpoint": (["eval", "--checkpoint", str(tmp_path / "nope"), "--tasks", "arc_easy"], "--checkpoint"),
        "not a checkpoint": (["eval", "--checkpoint", str(empty), "--tasks", "arc_easy"], "missing .metadata"),
        "unknown task": (["eval", "--checkpoint", checkpoint, "--tasks", "nosuch", "--benchmark-data", str(empty)],
                         "unknown task 'nosuch'"),
        "missing field": (["eval", "--config", str(configs["missing_field"]), *quiz], "missing_field.jsonl:2: missing field 'gold'"),
        "bad json line": (["eval", "--config", str(configs["bad_json"]), *quiz], "bad_json.jsonl:2: not valid JSON"),
        "column count": (["eval", "--config", str(configs["columns"]), *quiz], "quiz.csv:2: 5 columns; expected 6"),
        "one-choice task": (["eval", "--config", str(configs["one_choice"]), *quiz],
                            "(quiz): " + str(one_choice) + ":1: 'sols' has 1 option; a one-choice item"),
        "missing benchmark folder": (["eval", "--checkpoint", checkpoint, "--tasks", "arc_easy", "--benchmark-data",
                                      str(tmp_path / "nope")], "--benchmark-data"),
        "benchmark folder without the task": (["eval", "--checkpoint", checkpoint, "--tasks", "arc_easy",
                                               "--benchmark-data", str(empty)], "no file for 'arc_easy'"),
        "missing text file": (["eval", "--checkpoint", checkpoint, "--tasks", "quiz", "--config", str(configs["columns"]),
                               "--text-file", str(tmp_path / "nope.txt")], "--text-file"),
        "missing base": (["finetune", "--from", str(tmp_path / "nope")], "--from"),
        "no --from": (["finetune"], "--from"),
        "unknown model version": (["eval", "--checkpoint", "models:/raylm/9", "--tasks", "arc_easy"],
                                  "models:/raylm/9: no version 9 of model 'raylm'"),
        "unknown model alias": (["finetune", "--from", "models:/raylm@best-bpb"],
                                "models:/raylm@best-bpb: no alias @best-bpb of model 'raylm'"),
    }


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    return _bad_inputs(tmp_path_factory.mktemp("bad-inputs"))


CASES = ["missing checkpoint", "not a checkpoint", "unknown task", "missing field", "bad json line", "column count",
         "one-choice task",
         "missing benchmark folder", "benchmark folder without the task", "missing text file", "missing base", "no --from",
         "unknown model version", "unknown model alias"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_before_ray(case, bad_inputs, tmp_path, monkeypatch, capsys):
    """Issue 21: each of these ended after Ray's start-up (25-50 s), with exit 1, or without naming the file or line.
    In this process (each case in a subprocess cost ~5 s of imports): starting Ray fails the test."""
    import raylm.runtime

    def no_ray(*_, **__):
        raise AssertionError(f"{case}: Ray was started")

    monkeypatch.setattr(raylm.runtime, "init_ray", no_ray)
    monkeypatch.chdir(tmp_path)
    arguments, named = bad_inputs[case]
    try:
        code = main([*arguments, "--workspace", str(tmp_path / "ws")])
    except SystemExit as stopped:  # argparse's own refusals
        code = stopped.code
    stderr = capsys.readouterr().err
    said = [line for line in stderr.splitlines() if line.startswith("raylm")]
    assert code == 2 and len(said) == 1 and named in said[0], stderr
    assert "Traceback" not in stderr, stderr


def test_bad_input_exits_2_from_the_command_line(tmp_path):
    """The same refusal through a real `python -m raylm` process: the exit status and one line."""
    import os
    import subprocess
    import sys

    arguments, named = _bad_inputs(tmp_path)["missing checkpoint"]
    done = subprocess.run([sys.executable, "-m", "raylm", *arguments, "--workspace", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    said = [line for line in done.stderr.splitlines() if line.startswith("raylm")]
    assert done.returncode == 2 and len(said) == 1 and named in said[0], done.stderr
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr, done.stderr


@pytest.mark.slow
def test_eval_command_logs_the_sandbox_isolation(shared_data, ray_session, workspace_dir, tmp_path, capsys):
    from raylm.eval.sandbox import isolation_report

    if not isolation_report().startswith("ok"):
        pytest.skip(f"no OS fence on this machine: {isolation_report()}")
    checkpoint = make_checkpoint(tmp_path / "ckpt", seq_len=64)
    code = main(["eval", "--workspace", str(workspace_dir), "--checkpoint", str(checkpoint), "--tasks", "humaneval",
                 "--limit", "1", "--benchmark-data", str(shared_data / "benchmarks"), "--allow-code-execution",
                 "--set", "eval.max_gen_toks=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "HumanEval sandbox isolation: fence" in printed
    run = MlflowClient(f"sqlite:///{workspace_dir / 'mlflow.db'}").get_run(printed.rsplit("MLflow run: ", 1)[1].split()[0])
    assert run.data.tags["raylm.sandbox_isolation"] in ("fence", "fence+landlock")
    assert run.data.params["eval.sandbox_isolation"].startswith(run.data.tags["raylm.sandbox_isolation"])

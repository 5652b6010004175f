"""`raylm eval --checkpoint ...` end to end: results in the workspace and in an MLflow run."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from eval_helpers import make_checkpoint
from raylm.cli import main


@pytest.mark.slow
def test_eval_command_logs_tasks_to_mlflow(shared_data, ray_session, workspace_dir, tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path / "ckpt", seq_len=64)
    text = tmp_path / "notes.txt"
    text.write_text("The cat sat on the mat. Water boils at 100 degrees.\n" * 5)
    index = tmp_path / "index.json"
    index.write_text('{"ngram": 13, "contaminated_documents": 1, "tasks": {"arc_easy": ["arc_easy/1"]}}')
    code = main(["eval", "--workspace", str(workspace_dir), "--checkpoint", str(checkpoint), "--tasks", "arc_easy",
                 "--limit", "2", "--benchmark-data", str(shared_data / "benchmarks"), "--contamination-index",
                 str(index), "--text-file", str(text), "--set", "eval.batch_size=4"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "arc_easy" in printed and "MLflow run" in printed
    client = MlflowClient(f"sqlite:///{workspace_dir / 'mlflow.db'}")
    run_id = printed.rsplit("MLflow run: ", 1)[1].split()[0]
    run = client.get_run(run_id)
    metrics = run.data.metrics
    assert {"arc_easy/acc", "arc_easy/acc_norm", "arc_easy/acc.clean", "bpb/notes.txt"} <= set(metrics)
    assert metrics["arc_easy/n_contaminated"] == 1
    assert run.data.tags["raylm.checkpoint"] == str(checkpoint)
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"summary.md", "results.json", "scores.png", "samples/arc_easy.jsonl"} <= artifacts


def test_eval_command_rejects_unknown_checkpoint(workspace_dir, capsys):
    assert main(["eval", "--workspace", str(workspace_dir), "--checkpoint", "no-such-run", "--tasks", "arc_easy"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("raylm: eval failed: FileNotFoundError: ") and "neither an existing path nor an MLflow run id" in last
    assert "; full log: " in last


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

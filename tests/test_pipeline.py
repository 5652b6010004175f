"""End to end: `raylm pipeline` on the tiny config with real Ray, real MLflow and CPU torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow.dataset as pads
import pytest
from mlflow.tracking import MlflowClient

from raylm.cli import main
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.slow
EVAL_AT_START = ["--set", "train.eval_at_start=true"]  # val_loss_initial, for "training lowered val loss"


# The whole recipe on the tiny config, run once for this module: a two-trial sweep picks the learning rate,
# pretraining uses it, the chat set shipped in configs/data fine-tunes the model, and the quiz shipped there
# scores the fine-tuned model. The single-stage commands below add SHAPE to `--config tiny.yaml` to find its
# curate and tokenize folders.
SHAPE = ["--set", "model.seq_len=128", "--set", "tokenizer.vocab_size=1024"]  # fits most shipped conversations
RECIPE = [*SHAPE, "--set", "pipeline.tune=true", "--set", "tune.search_space={train.lr: {grid: [0.003, 0.01]}}",
          "--set", "tune.num_samples=1", "--set", "tune.budget_steps=10", "--set", "tune.grace_period=5",
          "--set", "tune.max_concurrent=2",
          "--set", f"finetune.data={REPO / 'configs' / 'data' / 'chat-python.jsonl'}", "--set", "finetune.max_steps=6", "--set", "finetune.val_fraction=0.25",
          "--set", "finetune.eval_every=3", "--set", "finetune.warmup_steps=1",
          "--set", "eval.tasks=[bpb, python_quiz]", "--set", "eval.limit=8",
          "--set", f"eval.extra_tasks=[{{name: python_quiz, layout: arc, path: {REPO / 'configs' / 'data' / 'python-quiz.jsonl'}}}]"]


@pytest.fixture(scope="module")
def finished_pipeline(ray_session, tmp_path_factory):
    workspace = tmp_path_factory.mktemp("pipeline")
    assert main(["pipeline", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(workspace), *RECIPE, *EVAL_AT_START]) == 0
    return workspace


def runs_by_name(workspace):
    client = MlflowClient(f"sqlite:///{workspace}/mlflow.db")
    experiment = client.get_experiment_by_name("raylm")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return client, runs


def test_parent_and_nested_runs_with_params_and_metrics(finished_pipeline):
    client, runs = runs_by_name(finished_pipeline)
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in nested) == ["curate", "eval", "eval", "finetune", "pretrain", "report",
                                                       "sft-data", "tokenize", "tune"]
    children = {r.info.run_name: r for r in nested if r.info.run_name != "eval"}
    held_out, benchmarks = sorted((r for r in nested if r.info.run_name == "eval"),
                                  key=lambda r: "raylm.fingerprint" not in r.data.tags)
    children["eval"] = held_out
    assert benchmarks.data.tags["raylm.checkpoint"] == children["finetune"].data.tags["raylm.checkpoint"]
    assert 0 <= benchmarks.data.metrics["python_quiz/acc"] <= 1 and benchmarks.data.metrics["bpb/val"] > 0
    assert parents[0].data.params["train.max_steps"] == "30"
    assert children["curate"].data.params["curate.val_fraction"] == "0.1"
    assert children["curate"].data.metrics["data/rows_input"] > 0
    assert children["tokenize"].data.metrics["data/vocab_size"] == 1024
    assert children["eval"].data.metrics["val/bpb"] > 0
    assert children["tokenize"].data.tags["raylm.input.curated"].startswith("curate:")
    history = client.get_metric_history(children["pretrain"].info.run_id, "train/loss")
    assert len(history) >= 3  # logged live from the rank-0 worker
    artifacts = {a.path for a in client.list_artifacts(children["curate"].info.run_id)}
    assert "manifest.json" in artifacts


def test_curation_accounts_for_every_row(finished_pipeline):
    client, runs = runs_by_name(finished_pipeline)
    curate = next(r for r in runs if r.info.run_name == "curate")
    metrics = {key.removeprefix("data/"): value for key, value in curate.data.metrics.items()}  # curate's section
    assert metrics["rows_input"] == metrics["rows_kept"] + metrics["rows_rejected"]
    output = curate.data.tags["raylm.output"]
    kept = sum(pads.dataset(f"{output}/kept/{s}", format="parquet").count_rows() for s in ("train", "val"))
    assert kept == metrics["rows_kept"]
    by_reason = {k.removeprefix("rows."): v for k, v in metrics.items() if k.startswith("rows.")}
    assert by_reason["kept"] == metrics["rows_kept"]
    assert sum(v for k, v in by_reason.items() if k != "kept") == metrics["rows_rejected"]
    assert by_reason.get("empty", 0) > 0  # the standard library has empty __init__.py files


def test_checkpoint_exists_and_training_lowered_val_loss(finished_pipeline):
    client, runs = runs_by_name(finished_pipeline)
    pretrain = next(r for r in runs if r.info.run_name == "pretrain")
    checkpoint = pretrain.data.tags["raylm.checkpoint"]
    assert os.path.exists(os.path.join(checkpoint, ".metadata"))
    assert os.path.exists(os.path.join(checkpoint, "trainer_state.json"))
    metrics = pretrain.data.metrics
    assert metrics["val/loss"] < metrics["val/loss_initial"] - 0.5


def test_model_registered_with_lineage_datasets_and_scores_then_served(finished_pipeline, tmp_path):
    """Issue 27: the pretrain run's best checkpoint is version 1 of model `raylm` (the experiment's name), with
    its lineage, the data of every stage as MLflow datasets, eval's scores on the logged model and @best-bpb;
    `mlflow models serve` answers an /invocations request with a continuation."""
    import json
    import signal
    import time
    import urllib.request

    from tests.s3_server import free_port

    client, runs = runs_by_name(finished_pipeline)
    by_name = {r.info.run_name: r for r in runs if r.data.tags.get("raylm.reused") == "false"}
    pretrain, tokenize = by_name["pretrain"], by_name["tokenize"]
    version = client.get_model_version("raylm", "1")
    tags = dict(version.tags)
    assert version.run_id == pretrain.info.run_id and tags["raylm.stage"] == "pretrain"
    for key in ("raylm.checkpoint", "raylm.config_hash", "raylm.fingerprint", "raylm.input.packed", "raylm.code_version"):
        assert tags[key] == pretrain.data.tags[key], key
    assert pretrain.data.tags["raylm.model_uri"] == "models:/raylm/1"
    assert str(client.get_model_version_by_alias("raylm", "best-bpb").version) == "1"

    inputs = {run: {i.dataset.name: i.dataset for i in by_name[run].inputs.dataset_inputs}
              for run in ("curate", "tokenize", "pretrain")}
    assert set(inputs["curate"]) == {"source[0]"}
    assert set(inputs["tokenize"]) == {"curated/train", "curated/val"}
    tokenize_key = tokenize.data.tags["raylm.fingerprint"].split(":", 1)[1]
    assert {name: d.digest for name, d in inputs["pretrain"].items()} == {"packed/train": tokenize_key,
                                                                         "packed/val": tokenize_key}
    model_id = pretrain.data.tags["raylm.model_id"]
    scores = {m.key: m for m in mlflow_logged_model(finished_pipeline, model_id).metrics}
    assert 0 < scores["val/bpb"].value < 10 and scores["val/bpb"].dataset_name == "packed/val"
    assert scores["val/bpb"].value == pytest.approx(by_name["eval"].data.metrics["val/bpb"])
    from raylm.registry import model_id_of

    final = client.get_model_version("raylm-finetune", "1")  # the fine-tuned model: the benchmarks' scores
    assert final.run_id == by_name["finetune"].info.run_id
    final_scores = {m.key: m.value for m in mlflow_logged_model(finished_pipeline, model_id_of(final)).metrics}
    assert 0 <= final_scores["python_quiz/acc"] <= 1 and final_scores["bpb/val"] > 0, final_scores

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{finished_pipeline}/mlflow.db",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/raylm/1",
                                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"inputs": ["import os"], "params": {"max_new_tokens": 8}}).encode())
        deadline, answer = time.monotonic() + 120, None
        while answer is None and time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answer = json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        assert answer is not None, (tmp_path / "serve.log").read_text()[-3000:]
        import mlflow.pyfunc

        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        here = mlflow.pyfunc.load_model("models:/raylm/1").predict(["import os"], params={"max_new_tokens": 8})
        assert answer == {"predictions": here} and len(here[0]) > 0, (answer, here)
    finally:
        server.send_signal(signal.SIGTERM)  # the CLI stops its uvicorn child on SIGTERM
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def mlflow_logged_model(workspace, model_id):
    return MlflowClient(f"sqlite:///{workspace}/mlflow.db").get_logged_model(model_id)


def test_encoder_decoder_trains_and_evaluates_through_the_same_stages(finished_pipeline):
    """The guide's encoder-decoder learns prefix-to-continuation over the same packed data."""
    overrides = [*SHAPE, "--set", "model.arch=encoder-decoder", "--set", "model.n_layers=1", "--set", "train.max_steps=20",
                 *EVAL_AT_START]
    for stage in ("pretrain", "eval"):
        assert main([stage, "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(finished_pipeline),
                     *overrides]) == 0
    _, runs = runs_by_name(finished_pipeline)
    pretrain = [r for r in runs if r.info.run_name == "pretrain"][-1]
    assert pretrain.data.params.get("model.arch", "encoder-decoder") == "encoder-decoder"
    assert pretrain.data.metrics["val/loss"] < pretrain.data.metrics["val/loss_initial"] - 0.3
    evaluation = [r for r in runs if r.info.run_name == "eval"][-1]
    assert 0 < evaluation.data.metrics["val/bpb"] < 8


def test_encoder_decoder_trains_by_span_corruption_and_evaluates_on_prefix(finished_pipeline):
    """T5's span corruption through the trainer: the sentinels sit above the tokenizer's vocabulary."""
    overrides = [*SHAPE, "--set", "model.arch=encoder-decoder", "--set", "model.n_layers=1", "--set", "train.max_steps=20",
                 "--set", "model.seq2seq_objective=span_corruption", *EVAL_AT_START]
    for stage in ("pretrain", "eval"):
        assert main([stage, "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(finished_pipeline),
                     *overrides]) == 0
    _, runs = runs_by_name(finished_pipeline)
    pretrain = [r for r in runs if r.info.run_name == "pretrain"][-1]
    assert pretrain.data.params.get("model.seq2seq_objective", "span_corruption") == "span_corruption"
    assert pretrain.data.metrics["val/loss"] < pretrain.data.metrics["val/loss_initial"]
    evaluation = [r for r in runs if r.info.run_name == "eval"][-1]
    assert 0 < evaluation.data.metrics["val/bpb"] < 10


def test_rerun_reuses_every_stage(finished_pipeline):
    assert main(["pipeline", "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(finished_pipeline),
                 *RECIPE, *EVAL_AT_START]) == 0
    _, runs = runs_by_name(finished_pipeline)
    latest_parent = [r for r in runs if r.info.run_name == "pipeline"][-1]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == latest_parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["curate", "eval", "finetune", "pretrain", "report",
                                                         "sft-data", "tokenize", "tune"]
    assert {r.data.tags["raylm.reused"] for r in children if r.info.run_name != "report"} == {"true"}


def test_single_stage_command_needs_its_inputs(tmp_path, capsys):
    """One line and exit 2, before Ray starts (it used to be a StageNotReady traceback after Ray's start)."""
    import ray

    started = ray.is_initialized()
    for command, missing in (("tokenize", "curate"), ("pretrain", "tokenize"), ("eval", "pretrain"), ("tune", "tokenize")):
        assert main([command, "--config", str(CONFIGS / "tiny.yaml"), "--workspace", str(tmp_path)]) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert error[-1].startswith(f"raylm: stage '{missing}' has not finished") and f"run `raylm {missing}`" in error[-1]
    assert ray.is_initialized() == started


def test_cli_help_and_config_errors_exit_before_work(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    shown = subprocess.run([sys.executable, "-m", "raylm", "--help"], capture_output=True, text=True, env=env)
    for command in ("curate", "tokenize", "pretrain", "eval", "pipeline"):
        assert command in shown.stdout
    workspace = tmp_path / "never-created"
    refused = subprocess.run([sys.executable, "-m", "raylm", "pipeline", "--config", str(CONFIGS / "tiny.yaml"),
                              "--set", "train.lr=-1", "--workspace", str(workspace)],
                             capture_output=True, text=True, env=env)
    assert refused.returncode == 2
    assert "train.lr = -1" in refused.stderr and "greater than 0" in refused.stderr
    assert not workspace.exists()


def test_mlflow_curves_start_at_the_first_real_step_and_constants_are_not_charted(finished_pipeline):
    """The stage summary used to be logged at step 0, over the curves (the chart then started with the final
    loss); per-report constants (workers, evaluated, ...) drew flat lines beside the real curves."""
    client, runs = runs_by_name(finished_pipeline)
    pretrain = next(r for r in runs if r.info.run_name == "pretrain")
    run_id, metrics = pretrain.info.run_id, pretrain.data.metrics

    def points(metric):
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))

    val = points("val/loss")
    assert val[0] == (0, pytest.approx(metrics["val/loss_initial"]))  # step 0 is the untrained model's loss
    assert [step for step, _ in val].count(0) == 1 and val[-1][0] == metrics["train/step"]
    assert all(step > 0 for step, _ in points("train/step_loss")) and all(step > 0 for step, _ in points("system/tokens_per_s"))
    assert len(points("system/workers")) == 1 and points("system/workers")[0][0] == metrics["train/step"]  # the summary's
    assert not {"evaluated", "system/resumed_from_step", "train/evaluated"} & set(metrics)
    sections = {name.split("/")[0] for name in metrics}  # MLflow's UI draws one chart section per prefix
    assert sections == {"train", "val", "system"}, sections
    experiment = client.get_experiment(pretrain.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_printed_mlflow_link_opens_the_runs_table(finished_pipeline, tmp_path):
    """Issue 22: MLflow 3.17's UI ignores `mlflow.experimentKind` and opens an experiment on the GenAI overview;
    the page the pipeline's summary points to (raylm.tracking.experiment_url) must open on the runs table,
    checked in a real `mlflow ui` rendered by headless Chromium."""
    import shutil
    import signal
    import time
    import urllib.request

    from raylm.tracking import experiment_url
    from tests.s3_server import free_port

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`; .ci/run installs it)")
    client, runs = runs_by_name(finished_pipeline)
    port = free_port()
    with open(tmp_path / "ui.log", "w") as log:
        ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                               f"sqlite:///{finished_pipeline}/mlflow.db", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and ui.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        page = experiment_url(f"http://127.0.0.1:{port}", runs[0].info.experiment_id)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                 "--virtual-time-budget=10000"]
        dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=180).stdout
        assert ">Runs<" in dom and ">pipeline<" in dom, (page, dom[-2000:], (tmp_path / "ui.log").read_text()[-2000:])
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def test_pipeline_ends_with_a_report_card(finished_pipeline):
    """report.md and a self-contained report.html with every section, in the workspace and in MLflow."""
    from raylm.report import SECTIONS, TITLES

    client, runs = runs_by_name(finished_pipeline)
    report = [r for r in runs if r.info.run_name == "report"][-1]  # a rerun writes the report again
    folder = report.data.tags["raylm.output"]
    markdown = open(os.path.join(folder, "report.md"), encoding="utf-8").read()
    page = open(os.path.join(folder, "report.html"), encoding="utf-8").read()
    for name in SECTIONS:
        assert f"## {TITLES[name]}" in markdown and f"<section id='{name}'>" in page
    assert "![loss.png](figures/loss.png)" in markdown and os.path.exists(os.path.join(folder, "figures", "loss.png"))
    assert "data:image/png;base64," in page and "src='http" not in page and "href='http" not in page
    assert "| rejected: empty |" in markdown  # the standard library's empty __init__.py files
    assert "not run for this config" not in markdown  # the recipe ran every step: tune, finetune, benchmarks
    assert "| python_quiz | acc" in markdown and "| val loss before -> after |" in markdown
    assert markdown.count("lr=0.0") >= 2  # both trials of the sweep
    pretrain = next(r for r in runs if r.info.run_name == "pretrain")
    assert pretrain.info.run_id in markdown  # lineage
    assert markdown.count("\n- `") == 3  # three samples from the final checkpoint
    logged = {a.path for a in client.list_artifacts(report.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/loss.png"} <= logged


def test_report_renders_in_a_headless_browser(finished_pipeline, tmp_path):
    """Chromium (Debian's package) opens report.html with no network, and every section and figure is there."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`; .ci/run installs it)")
    client, runs = runs_by_name(finished_pipeline)
    folder = [r for r in runs if r.info.run_name == "report"][-1].data.tags["raylm.output"]
    page = f"file://{folder}/report.html"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
    from raylm.report import SECTIONS

    for name in SECTIONS:
        assert f'<section id="{name}">' in dom
    assert dom.count("<img ") >= 2
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,2400", page],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one

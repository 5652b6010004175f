"""Checkpoints as registered MLflow models, on a real SQLite store: logged, loaded, found by `models:/`, scored.

A tiny DCP checkpoint written by the trainer's saver, no Ray: the pipeline test (tests/test_pipeline.py)
checks the same on the models its stages register, and serves one with `mlflow models serve`.
"""

from __future__ import annotations

import json
import os

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from raylm import registry, tracking
from raylm.cli import main
from raylm.config import TrackingConfig
from raylm.data.tokenizer import tokenizer_from_json
from raylm.model import TransformerConfig, build_model
from raylm.model.generate import generate_text
from raylm.tracking import Tracker
from raylm.train.checkpoint import load_model, save_checkpoint
from raylm.workspace import Workspace

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def store(tmp_path):
    """A workspace with its default SQLite store, and two checkpoints of one tiny model (different weights)."""
    from test_model_hf import tokenizer_json

    config = TransformerConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, seq_len=32)
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(config)
        directory = str(tmp_path / f"ckpt{seed}")
        save_checkpoint(directory, model, torch.optim.AdamW(model.parameters()), {"step": 1}, config.to_dict(),
                        tokenizer_json(), rank=0)
        checkpoints.append(directory)
    workspace = tmp_path / "workspace"
    tracker = Tracker(TrackingConfig(experiment="tiny"), Workspace(str(workspace)))
    return tracker, str(workspace), checkpoints


def register(tracker: Tracker, checkpoint: str, stage: str = "pretrain", **config) -> registry.RegisteredModel:
    with tracker.run(stage, tags={"raylm.config_hash": "c0ffee", "raylm.fingerprint": f"{stage}:abc",
                                  "raylm.input.packed": "tokenize:def"}):
        return registry.log_checkpoint_model(checkpoint, TrackingConfig(experiment="tiny", **config), stage)


def test_logged_model_loads_from_code_and_continues_prompts_like_generate(store):
    tracker, _, (checkpoint, _) = store
    registered = register(tracker, checkpoint)
    assert (registered.name, registered.version) == ("tiny", "1")
    folder = mlflow.artifacts.download_artifacts(registered.uri)
    files = {os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder) for name in names}
    assert {"artifacts/model.safetensors", "artifacts/model_config.json", "artifacts/tokenizer.json",
            "pyfunc_model.py", "MLmodel", "input_example.json"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".bin", ".cloudpickle"))], files
    with open(os.path.join(folder, "MLmodel")) as handle:
        mlmodel = handle.read()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "signature:" in mlmodel  # built from code

    loaded = mlflow.pyfunc.load_model(registered.uri)
    prompts = ["def f(x):", "return"]
    model, tokenizer = load_model(checkpoint), tokenizer_from_json(open(os.path.join(checkpoint, "tokenizer.json")).read())
    expected = generate_text(model, tokenizer, prompts, 6)
    assert loaded.predict(prompts, params={"max_new_tokens": 6}) == expected
    assert loaded.predict(pd.DataFrame({"prompt": prompts}), params={"max_new_tokens": 6}) == expected
    sampled = loaded.predict(["def"], params={"max_new_tokens": 6, "temperature": 0.9, "top_k": 20, "top_p": 0.9,
                                              "seed": 3})
    assert len(sampled) == 1 and isinstance(sampled[0], str)
    assert loaded.metadata.get_params_schema().to_dict()[0]["name"] == "max_new_tokens"

    client = MlflowClient(tracker.uri)
    version = client.get_model_version("tiny", "1")
    tags = dict(version.tags)
    assert tags["raylm.config_hash"] == "c0ffee" and tags["raylm.input.packed"] == "tokenize:def"
    assert tags["raylm.checkpoint"] == checkpoint and tags["raylm.code_version"]
    assert registry.model_id_of(version) == registered.model_id
    logged = mlflow.get_logged_model(registered.model_id)
    assert logged.source_run_id == version.run_id and logged.tags["raylm.fingerprint"] == "pretrain:abc"
    run = client.get_run(version.run_id)
    assert run.data.tags["raylm.model_uri"] == "models:/tiny/1"


def test_versions_aliases_and_scores_on_the_model(store):
    tracker, _, (first, second) = store
    client = MlflowClient(tracker.uri)
    one, two = register(tracker, first), register(tracker, second)
    assert (one.version, two.version) == ("1", "2")
    eval_run = client.create_run(tracker.experiment_id, run_name="eval", tags={"raylm.stage": "eval"}).info.run_id
    val = tracking.dataset("curated/val", "/data/val", "abc123", {"text": "string"})
    runs = {str(v.version): v.run_id for v in client.search_model_versions("name = 'tiny'")}

    assert registry.record_scores(client, runs["1"], {"val_bpb": 2.0, "val_loss": 1.4}, "val_bpb", val, eval_run) \
        == ["models:/tiny/1"]
    assert str(client.get_model_version_by_alias("tiny", "best-bpb").version) == "1"
    registry.record_scores(client, runs["2"], {"val_bpb": 2.5}, "val_bpb", run_id=eval_run)
    assert str(client.get_model_version_by_alias("tiny", "best-bpb").version) == "1"  # worse: the alias stays
    registry.record_scores(client, runs["2"], {"val_bpb": 1.5}, "val_bpb", run_id=eval_run)
    assert str(client.get_model_version_by_alias("tiny", "best-bpb").version) == "2"
    assert dict(client.get_model_version("tiny", "2").tags)["raylm.val_bpb"] == "1.5"

    metrics = {m.key: m for m in mlflow.get_logged_model(one.model_id).metrics}
    assert metrics["val/bpb"].value == 2.0 and metrics["val/bpb"].dataset_name == "curated/val"  # the eval run's names
    assert metrics["val/bpb"].dataset_digest == "abc123" and metrics["val/bpb"].run_id == eval_run
    assert registry.checkpoint_for("models:/tiny@best-bpb", tracker.uri) == (second, runs["2"])
    assert registry.checkpoint_for("models:/tiny/1", tracker.uri) == (first, runs["1"])
    assert registry.checkpoint_for(first, tracker.uri) == (first, None)


def test_unknown_names_and_aliases_name_the_registered_versions(store):
    tracker, _, (checkpoint, _) = store
    register(tracker, checkpoint)
    MlflowClient(tracker.uri).set_registered_model_alias("tiny", "prod", "1")
    cases = {"models:/tiny/4": "no version 4 of model 'tiny'",
             "models:/tiny@staging": "no alias @staging of model 'tiny'",
             "models:/other/1": "no registered model 'other' (registered: tiny)",
             "models:/tiny": "expected models:/NAME/VERSION or models:/NAME@ALIAS"}
    for reference, expected in cases.items():
        with pytest.raises(registry.ModelReferenceError) as caught:
            registry.checkpoint_for(reference, tracker.uri)
        assert expected in str(caught.value) and reference in str(caught.value)
        if "tiny'" in expected:
            assert "registered versions of 'tiny': 1 (@prod)" in str(caught.value)


def test_cli_takes_models_uris_and_refuses_unknown_ones_in_one_line(store, tmp_path, capsys):
    tracker, workspace, (checkpoint, _) = store
    register(tracker, checkpoint)
    capsys.readouterr()
    prompt = ["--prompt", "def", "--max-new-tokens", "5"]
    assert main(["generate", "--checkpoint", checkpoint, *prompt]) == 0
    by_path = capsys.readouterr().out
    assert main(["generate", "--checkpoint", "models:/tiny/1", "--config", _config(tmp_path, workspace), *prompt]) == 0
    assert capsys.readouterr().out == by_path
    out = str(tmp_path / "hf")
    assert main(["export", "--checkpoint", "models:/tiny/1", "--config", _config(tmp_path, workspace), "--out", out]) == 0
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    capsys.readouterr()
    assert main(["generate", "--checkpoint", "models:/tiny@best", "--config", _config(tmp_path, workspace), *prompt]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "models:/tiny@best" in error and "registered versions of 'tiny': 1" in error


def _config(tmp_path, workspace: str) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps({"workspace": {"root": workspace}, "tracking": {"experiment": "tiny"}}))
    return str(path)


def test_registration_can_be_switched_off_and_names_follow_the_config(store):
    tracker, _, (checkpoint, _) = store
    assert register(tracker, checkpoint, register_models=False) is None
    assert register(tracker, checkpoint, "finetune").name == "tiny-finetune"
    assert register(tracker, checkpoint, registered_model="coder").uri == "models:/coder/1"


def test_datasets_are_run_inputs_with_digest_schema_and_counts(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    with mlflow.start_run() as run:
        tracking.log_dataset("packed/train", str(tmp_path / "train"), "0123456789abcdef", "training",
                             {"sequences": 12, "tokens": 700}, {"tokens": "list<integer>"})
        tracking.log_dataset("source[0]", "hf://datasets/someone/corpus", "feed", "curation", {"rows": 3})
    inputs = {i.dataset.name: i for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
    train = inputs["packed/train"]
    assert train.dataset.digest == "0123456789abcdef" and json.loads(train.dataset.source)["uri"] == str(tmp_path / "train")
    assert json.loads(train.dataset.schema)["mlflow_colspec"][0] == {"type": "array", "items": {"type": "integer"},
                                                                    "name": "tokens", "required": True}
    assert {t.key: t.value for t in train.tags} == {"mlflow.data.context": "training", "sequences": "12", "tokens": "700"}
    assert "hf://datasets/someone/corpus" in inputs["source[0]"].dataset.source


def test_a_decoder_also_logs_a_transformers_pipeline_when_asked(store):
    pytest.importorskip("transformers")
    tracker, _, (checkpoint, _) = store
    registered = register(tracker, checkpoint, log_transformers=True)
    run = MlflowClient(tracker.uri).get_run(MlflowClient(tracker.uri).get_model_version("tiny", registered.version).run_id)
    pipeline = mlflow.transformers.load_model(run.data.tags["raylm.hf_model_uri"])
    expected = mlflow.pyfunc.load_model(registered.uri).predict(["def f(x):"], params={"max_new_tokens": 5})[0]
    generated = pipeline("def f(x):", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert generated.startswith("def f(x):") and len(generated) > len("def f(x):")
    assert expected  # the same weights behind both flavors: greedy continuations agree on their first token
    assert generated.removeprefix("def f(x):")[:1] == expected[:1]

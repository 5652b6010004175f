"""Config loading, typed overrides, and every refusal with its message."""

from __future__ import annotations

import pytest

from raylm.config import ConfigError, load_config, parse_override
from tests.conftest import CONFIGS


def refusal(*overrides: str, path=CONFIGS / "tiny.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, list(overrides))
    return str(caught.value)


def test_default_and_test_configs_load():
    laptop = load_config(CONFIGS / "laptop.yaml")
    tiny = load_config(CONFIGS / "tiny.yaml")
    assert laptop.data.sources[0].path == "python-stdlib"
    assert tiny.model.d_model < laptop.model.d_model
    assert load_config(None).model == laptop.model  # laptop.yaml is the default


def test_overrides_are_typed():
    config = load_config(CONFIGS / "tiny.yaml", ["train.lr=3e-4", "train.max_steps=7", "model.tie_embeddings=false",
                                                 "train.workers=1-2", "eval.tasks=[bpb, arc_easy]"])
    assert config.train.lr == pytest.approx(3e-4) and isinstance(config.train.lr, float)
    assert config.train.max_steps == 7
    assert config.model.tie_embeddings is False
    assert (config.train.min_workers, config.train.max_workers) == (1, 2)
    assert config.eval.tasks == ["bpb", "arc_easy"]
    assert parse_override("a.b=3e-4") == (["a", "b"], 3e-4)
    assert parse_override("a.b=hello") == (["a", "b"], "hello")


def test_workspace_argument_and_environment(monkeypatch, tmp_path):
    assert load_config(CONFIGS / "tiny.yaml", workspace=str(tmp_path)).workspace.root == str(tmp_path)
    monkeypatch.setenv("RAYLM_WORKSPACE", "s3://bucket/raylm")
    assert load_config(CONFIGS / "tiny.yaml").workspace.root == "s3://bucket/raylm"


def test_unknown_key_lists_valid_keys():
    message = refusal("train.lrr=0.1")
    assert "unknown key 'train.lrr'" in message
    assert "valid keys of 'train'" in message and "lr" in message and "max_steps" in message


def test_unknown_nested_key_in_a_list_names_its_index():
    message = refusal("data.sources=[{path: python-stdlib, colour: red}]")
    assert "unknown key 'data.sources[0].colour'" in message
    assert "text_field" in message


def test_unknown_section():
    assert "unknown key 'trian'" in refusal("trian.lr=1")


@pytest.mark.parametrize("override, key, expected", [
    ("train.lr=0", "train.lr", "greater than 0"),
    ("train.lr=-1", "train.lr", "greater than 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size", "greater than 0"),
    ("train.global_batch_size=0", "train.global_batch_size", "greater than 0"),
    ("model.seq_len=1", "model.seq_len", "greater than or equal to 2"),
    ("data.val_fraction=0", "data.val_fraction", "greater than 0"),
    ("data.val_fraction=1", "data.val_fraction", "less than 1"),
    ("train.workers=[3, 2]", "train.workers", "min workers (3) > max workers (2)"),
    ("train.workers=0", "train.workers", "workers must be >= 1"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker", "greater than 0"),
    ("train.cpus_per_worker=half", "train.cpus_per_worker", "valid number"),
    ("tokenizer.path=/no/such/tokenizer.json", "tokenizer.path", "path does not exist: /no/such/tokenizer.json"),
    ("data.sources=[{path: /no/such/corpus}]", "data.sources[0].path", "path does not exist"),
    ("model.n_heads=3", "model.d_model", "divisible by model.n_heads = 3"),
    ("model.position=alibi", "model.position", "expected one of rope, learned, sinusoidal"),
])
def test_invalid_values_are_refused_with_key_value_and_expectation(override, key, expected):
    message = refusal(override)
    assert key in message and expected in message
    value = override.split("=", 1)[1]
    if key != "model" and not value.startswith(("[", "{")):
        assert value in message


def test_several_problems_are_reported_together():
    message = refusal("train.lr=0", "model.seq_len=1")
    assert "train.lr" in message and "model.seq_len" in message


def test_bad_files(tmp_path):
    assert "config file not found" in refusal(path=tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  lr: [1, 2\nmodel: {}\n")
    message = refusal(path=broken)
    assert f"{broken}:" in message and "not valid YAML" in message
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string\n")
    assert "expected a mapping" in refusal(path=scalar)


def test_malformed_override():
    assert "expected section.key=value" in refusal("train.lr")
    assert "is not a section" in refusal("train.lr.x=1")


@pytest.mark.parametrize("overrides, message", [
    (["train.global_batch_tokens=64", "train.workers=2"],
     "train.global_batch_tokens = 64: 1 sequence(s) of model.seq_len 64 per step, expected at least one per worker "
     "(2, train.workers)"),
    (["train.global_batch_tokens=100"], "train.global_batch_tokens = 100: expected a multiple of model.seq_len (64)"),
])
def test_global_batch_tokens_must_give_every_worker_a_sequence(overrides, message):
    """Found only by gloo, 54 s into the run, before this check."""
    with pytest.raises(ConfigError) as caught:
        load_config(str(CONFIGS / "tiny.yaml"), overrides)
    assert str(caught.value).splitlines() == [message] or message in str(caught.value)
    assert load_config(str(CONFIGS / "tiny.yaml"), ["train.global_batch_tokens=128", "train.workers=2"])


def test_config_error_survives_pickling_as_ray_sends_it():
    """Raised in a Tune trial, it reached the driver as one problem per character of its message."""
    import pickle

    from raylm.config import ConfigError

    error = pickle.loads(pickle.dumps(ConfigError(["train.lr = -1: expected > 0"], "tune trial")))
    assert error.problems == ["train.lr = -1: expected > 0"] and str(error).count("\n  - ") == 1


def test_relative_files_for_workers_become_absolute(tmp_path, monkeypatch):
    """Tune trials and eval actors read the config in other folders than the command's."""
    from raylm.config import validate_config

    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "quiz.jsonl").write_text('{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    monkeypatch.chdir(tmp_path)
    config = validate_config({"finetune": {"data": "chat.jsonl"},
                              "eval": {"extra_tasks": [{"name": "quiz", "layout": "arc", "path": "quiz.jsonl"}]}})
    assert config.finetune.data == str(tmp_path / "chat.jsonl")
    assert config.eval.extra_tasks[0].path == str(tmp_path / "quiz.jsonl")

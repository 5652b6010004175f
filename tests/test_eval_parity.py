"""Parity with lm-eval's own `hf` backend: the same tiny checkpoint exported to a Hugging Face folder,
evaluated by lm-eval's HFLM and by raylm's adapter, gives the same per-item predictions and scores."""

from __future__ import annotations

import json

import pytest

from eval_helpers import make_checkpoint, write_long_quiz
from raylm.eval.suite import EvalSettings, evaluate_checkpoint

transformers = pytest.importorskip("transformers")


def export(checkpoint, out):
    from raylm.model.hf import export_hf
    from raylm.train.checkpoint import load_model, load_model_config, load_tokenizer_json

    model = load_model(str(checkpoint))
    return export_hf(model, load_model_config(str(checkpoint)), load_tokenizer_json(str(checkpoint)), str(out))


def _rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_same_predictions_and_scores_as_lm_eval_hf(shared_data, tmp_path):
    from lm_eval.models.huggingface import HFLM

    from raylm.eval.lm import RaylmLM

    checkpoint = make_checkpoint(tmp_path / "ckpt", seq_len=96)
    folder = export(checkpoint, tmp_path / "hf")
    hf = HFLM(pretrained=folder, device="cpu", batch_size=4, max_length=96)
    ours = RaylmLM(checkpoint=str(checkpoint), batch_size=4, max_gen_toks=16)
    # long_quiz: an item whose context is far longer than the window, left-truncated by both (issue 21);
    # hf stops on a continuation longer than the window, so that case is tested against direct logits only
    quiz = write_long_quiz(tmp_path / "long_quiz.jsonl", long_choice=False)
    settings = EvalSettings(tasks=["arc_easy", "hellaswag", "truthfulqa_mc2", "gsm8k", "long_quiz"], limit=3,
                            num_fewshot=0, benchmark_data=str(shared_data / "benchmarks"), max_gen_toks=16,
                            gen_kwargs={"max_gen_toks": 16},
                            extra_tasks=[{"name": "long_quiz", "layout": "arc", "path": str(quiz)}])
    theirs_results = evaluate_checkpoint(str(checkpoint), settings, str(tmp_path / "hf_out"), lm=hf)
    ours_results = evaluate_checkpoint(str(checkpoint), settings, str(tmp_path / "raylm_out"), lm=ours)
    assert ours_results["tasks"]["long_quiz"]["truncated"] == 1
    for task in ("arc_easy", "hellaswag", "truthfulqa_mc2", "long_quiz"):
        a, b = _rows(ours_results["files"][task]), _rows(theirs_results["files"][task])
        assert len(a) == len(b) == (2 if task == "long_quiz" else 3)
        for x, y in zip(a, b):
            ll_x = [float(v[0]) for v in x["filtered_resps"]]
            ll_y = [float(v[0]) for v in y["filtered_resps"]]
            assert ll_x == pytest.approx(ll_y, abs=2e-4), task
            assert ll_x.index(max(ll_x)) == ll_y.index(max(ll_y)), task
        assert ours_results["tasks"][task]["all"] == pytest.approx(theirs_results["tasks"][task]["all"], abs=1e-6)
    # generation: same greedy text before the stop sequences
    a, b = _rows(ours_results["files"]["gsm8k"]), _rows(theirs_results["files"]["gsm8k"])
    assert [x["resps"] for x in a] == [y["resps"] for y in b]


@pytest.mark.slow
def test_every_scoring_shape_matches_lm_eval_hf(tmp_path):
    """Issue 21: each shape added by configuration (per-choice contexts, cloze, generation, renamed fields,
    a task YAML by path), each with an item longer than the context, gives lm-eval's `hf` backend's
    predictions on the exported model."""
    from lm_eval.models.huggingface import HFLM

    from eval_helpers import write_shapes
    from raylm.eval.lm import RaylmLM

    checkpoint = make_checkpoint(tmp_path / "ckpt", seq_len=96)
    hf = HFLM(pretrained=export(checkpoint, tmp_path / "hf"), device="cpu", batch_size=4, max_length=96)
    extra, paths, names = write_shapes(tmp_path / "data")
    settings = EvalSettings(tasks=names, extra_tasks=extra, task_paths=paths, max_gen_toks=8,
                            gen_kwargs={"max_gen_toks": 8})
    theirs = evaluate_checkpoint(str(checkpoint), settings, str(tmp_path / "hf_out"), lm=hf)
    ours = evaluate_checkpoint(str(checkpoint), settings, str(tmp_path / "raylm_out"),
                               lm=RaylmLM(checkpoint=str(checkpoint), batch_size=4, max_gen_toks=8))
    for task in names:
        a, b = _rows(ours["files"][task]), _rows(theirs["files"][task])
        assert len(a) == len(b) == 3, task
        for x, y in zip(a, b):
            if task == "my_gsm":
                assert x["resps"] == y["resps"] and x["filtered_resps"] == y["filtered_resps"], task
                continue
            responses = x["filtered_resps"] if isinstance(x["filtered_resps"][0], list) else [x["filtered_resps"]]
            theirs_responses = y["filtered_resps"] if isinstance(y["filtered_resps"][0], list) else [y["filtered_resps"]]
            ll_x, ll_y = [float(v[0]) for v in responses], [float(v[0]) for v in theirs_responses]
            assert ll_x == pytest.approx(ll_y, abs=2e-4), task
            assert ll_x.index(max(ll_x)) == ll_y.index(max(ll_y)), task
            assert [bool(v[1]) for v in responses] == [bool(v[1]) for v in theirs_responses], task  # greedy
        assert ours["tasks"][task]["all"] == pytest.approx(theirs["tasks"][task]["all"], rel=1e-4), task

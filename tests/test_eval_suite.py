"""Every suite task converts and runs on a few items of the shared benchmarks; contamination splits;
the domain task; configured extra tasks; 2 actors equal 1."""

from __future__ import annotations

import json

import pytest

from eval_helpers import make_checkpoint
from raylm.eval.contamination import load_index, split_scores
from raylm.eval.suite import EvalSettings, evaluate_checkpoint, summary_text


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(make_checkpoint(tmp_path_factory.mktemp("ckpt") / "c", seq_len=96))


@pytest.fixture(scope="module")
def lm(checkpoint):
    from raylm.eval.lm import RaylmLM

    return RaylmLM(checkpoint=checkpoint, batch_size=8, max_gen_toks=24)


def _bench(shared_data):
    return str(shared_data / "benchmarks")


@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "hellaswag", "mmlu_anatomy", "truthfulqa_mc1",
                                  "truthfulqa_mc2"])
def test_multiple_choice_tasks_convert_and_run(task, shared_data, checkpoint, lm, tmp_path):
    settings = EvalSettings(tasks=[task], limit=3, benchmark_data=_bench(shared_data))
    results = evaluate_checkpoint(checkpoint, settings, str(tmp_path), lm=lm)
    entry = results["tasks"][task]
    assert entry["n_items"] == 3
    assert 0.0 <= entry["all"]["acc,none"] <= 1.0
    assert entry["all"]["acc,none"] == pytest.approx(entry["reported"]["acc,none"])
    rows = [json.loads(line) for line in open(results["files"][task])]
    assert [r["doc"]["raylm_id"].rsplit("/", 1)[1] for r in rows] == ["0", "1", "2"]


@pytest.mark.slow
def test_mmlu_group_five_shot(shared_data, checkpoint, lm, tmp_path):
    settings = EvalSettings(tasks=["mmlu"], limit=1, num_fewshot=5, benchmark_data=_bench(shared_data))
    results = evaluate_checkpoint(checkpoint, settings, str(tmp_path), lm=lm)
    subjects = [t for t in results["tasks"] if t.startswith("mmlu_")]
    assert len(subjects) == 57
    assert results["tasks"]["mmlu"]["n_items"] == 57
    order = [row["task"] for row in results["summary"]]  # the aggregate first, its 57 subjects after
    assert order[0] == "mmlu" and order[1:] == results["groups"]["mmlu"] and len(order) == 58
    sample = json.loads(open(results["files"]["mmlu_anatomy"]).readline())
    prompt = sample["arguments"]["gen_args_0"]["arg_0"] if isinstance(sample["arguments"], dict) else sample["arguments"][0][0]
    assert prompt.count("Answer:") == 6  # five dev examples, then the question


def test_arc_and_truthfulqa_groups_get_an_aggregate_row_above_their_members(shared_data, checkpoint, lm, tmp_path):
    """Issue 21: lm-eval only tags ARC and TruthfulQA; their aggregate is the mean over all their items."""
    settings = EvalSettings(tasks=["arc", "truthfulqa"], limit=2, benchmark_data=_bench(shared_data))
    results = evaluate_checkpoint(checkpoint, settings, str(tmp_path), lm=lm)
    order = [row["task"] for row in results["summary"]]
    assert order == ["arc", "truthfulqa", "arc_easy", "arc_challenge", "truthfulqa_mc1", "truthfulqa_mc2"], order
    tasks = results["tasks"]
    # ARC: 2 + 2 questions; TruthfulQA: the same 2 questions scored two ways (mc1, mc2)
    for group, (one, two), questions in (("arc", ("arc_easy", "arc_challenge"), 4),
                                         ("truthfulqa", ("truthfulqa_mc1", "truthfulqa_mc2"), 2)):
        assert tasks[group]["n_items"] == questions
        pooled = (tasks[one]["all"]["acc,none"] + tasks[two]["all"]["acc,none"]) / 2  # two items each
        assert tasks[group]["all"]["acc,none"] == pytest.approx(pooled)
        assert results["metrics"][f"{group}/acc"] == pytest.approx(pooled)
    assert summary_text(results).index("| arc |") < summary_text(results).index("### arc: 2 subtasks")


@pytest.mark.slow
def test_generation_tasks_run(shared_data, checkpoint, lm, tmp_path):
    settings = EvalSettings(tasks=["gsm8k", "humaneval", "mt_bench"], limit=2, num_fewshot=None,
                            benchmark_data=_bench(shared_data), allow_code_execution=True, max_gen_toks=24)
    results = evaluate_checkpoint(checkpoint, settings, str(tmp_path), lm=lm)
    assert "exact_match,strict-match" in results["tasks"]["gsm8k"]["all"]
    assert results["tasks"]["humaneval"]["all"]["pass_at_k,create_test"] in (0.0, 0.5, 1.0)
    assert results["sandbox_isolation"].split()[0] in ("fence", "fence+landlock", "weak")
    assert results["tasks"]["mt_bench"]["scored"] is False
    answers = [json.loads(line) for line in open(results["files"]["mt_bench"])]
    assert len(answers) == 2 and all(len(a["answers"]) == 2 for a in answers)
    assert any(r["task"] == "mt_bench" and "UNSCORED" in r["metric"] for r in results["summary"])


def test_humaneval_is_refused_without_opt_in(shared_data, checkpoint, lm, tmp_path, monkeypatch):
    from raylm.eval.sandbox import CodeExecutionRefused

    monkeypatch.delenv("RAYLM_ALLOW_CODE_EXECUTION", raising=False)
    settings = EvalSettings(tasks=["humaneval"], limit=1, benchmark_data=_bench(shared_data))
    with pytest.raises(CodeExecutionRefused):
        evaluate_checkpoint(checkpoint, settings, str(tmp_path), lm=lm)


def test_contamination_split_scores(shared_data, checkpoint, lm, tmp_path):
    index_file = tmp_path / "index.json"
    index_file.write_text(json.dumps({"ngram": 13, "contaminated_documents": 2,  # curation's layout
                                      "tasks": {"arc_easy": ["arc_easy/0", "arc_easy/2"], "hellaswag": []}}))
    settings = EvalSettings(tasks=["arc_easy"], limit=4, benchmark_data=_bench(shared_data),
                            contamination_index=str(index_file))
    results = evaluate_checkpoint(checkpoint, settings, str(tmp_path / "out"), lm=lm)
    entry = results["tasks"]["arc_easy"]
    assert (entry["n_items"], entry["n_clean"], entry["n_contaminated"]) == (4, 2, 2)
    rows = [json.loads(line) for line in open(results["files"]["arc_easy"])]
    clean = [r["acc"] for r in rows if r["doc"]["raylm_id"] in ("arc_easy/1", "arc_easy/3")]
    assert entry["clean"]["acc,none"] == pytest.approx(sum(clean) / 2)
    assert "arc_easy/acc.clean" in results["metrics"]


def test_index_reader_is_tolerant(tmp_path):
    lines = tmp_path / "index.jsonl"
    lines.write_text('{"task": "gsm8k", "item_id": "gsm8k/3"}\n{"item_id": "mmlu_anatomy/7"}\n')
    assert load_index(lines) == {"gsm8k": {"gsm8k/3"}, "mmlu_anatomy": {"mmlu_anatomy/7"}}
    nested = tmp_path / "index.json"
    nested.write_text(json.dumps({"tasks": {"arc_easy": ["arc_easy/1"]}}))
    assert load_index(nested) == {"arc_easy": {"arc_easy/1"}}
    samples = [{"doc": {"raylm_id": "arc_easy/1"}, "acc": 1.0, "filter": "none"},
               {"doc": {"raylm_id": "arc_easy/2"}, "acc": 0.0, "filter": "none"}]
    split = split_scores(samples, load_index(nested))
    assert split["metrics"]["acc,none"] == {"all": 0.5, "clean": 0.0}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"gsm8k": ["gsm8k/1"]}))
    assert load_index(plain) == {"gsm8k": {"gsm8k/1"}}
    unchecked = split_scores(samples, {"gsm8k": {"gsm8k/1"}})  # arc_easy not in the index: clean unknown
    assert unchecked["n_clean"] is None and unchecked["metrics"]["acc,none"]["clean"] != unchecked["metrics"]["acc,none"]["clean"]


def test_domain_task_from_held_out_text(checkpoint, lm, tmp_path):
    from eval_helpers import TEXTS

    held_out = tmp_path / "val.jsonl"
    words = " ".join(TEXTS).split()
    with open(held_out, "w") as handle:
        for i in range(8):
            handle.write(json.dumps({"text": " ".join(words[i * 40:(i + 1) * 40])}) + "\n")
    settings = EvalSettings(tasks=["domain"], domain_data=str(held_out), domain_items=5)
    results = evaluate_checkpoint(checkpoint, settings, str(tmp_path / "out"), lm=lm)
    assert results["tasks"]["domain"]["n_items"] == 5
    docs = [json.loads(line)["doc"] for line in open(results["files"]["domain"])]
    assert all(len(d["endings"]) == 4 and len(set(d["endings"])) == 4 for d in docs)


def test_held_out_text_reads_a_parquet_folder_jsonl_and_plain_text_and_names_a_bad_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raylm.eval.domain import read_texts

    split = tmp_path / "kept" / "val"
    split.mkdir(parents=True)
    pq.write_table(pa.table({"text": ["première", "", "zweite"]}), split / "part-0.parquet")
    (split / "_SUCCESS").write_text("")  # the commit marker beside the shards is not a parquet file
    assert sorted(read_texts(str(split))) == ["première", "zweite"]
    plain = tmp_path / "val.txt"
    plain.write_text("one\n\n\ntwo\nlines\n")
    assert list(read_texts(str(plain))) == ["one", "two\nlines"]
    lines = tmp_path / "val.jsonl"
    lines.write_text('{"text": "a"}\n\n["not", "an", "object"]\n')
    with pytest.raises(ValueError, match=r"val.jsonl:3: expected a JSON object with 'text'"):
        list(read_texts(str(lines)))


def test_extra_multiple_choice_task_by_configuration(shared_data, checkpoint, lm, tmp_path):
    source = shared_data / "benchmarks" / "arc" / "llm-foundry-icl" / "arc_easy_test.jsonl"
    mine = tmp_path / "my_science.jsonl"
    mine.write_text("".join(open(source).readlines()[:5]))
    extra = {"name": "my_science", "layout": "arc", "path": str(mine)}
    settings = EvalSettings(tasks=["my_science"], extra_tasks=[extra])
    results = evaluate_checkpoint(checkpoint, settings, str(tmp_path / "out"), lm=lm)
    assert results["tasks"]["my_science"]["n_items"] == 5


@pytest.mark.slow
def test_two_actors_equal_one(shared_data, checkpoint, ray_session, tmp_path):
    from raylm.eval.actors import ActorPoolLM
    from raylm.eval.lm import RaylmLM

    base = dict(tasks=["arc_easy", "hellaswag", "gsm8k"], limit=4, num_fewshot=0, batch_size=2,
                benchmark_data=_bench(shared_data), gen_kwargs={"max_gen_toks": 8})
    results = {}
    for n in (1, 2):
        pool = ActorPoolLM(checkpoint, actors=n, num_gpus=0, num_cpus=1, batch_size=2)
        results[n] = evaluate_checkpoint(checkpoint, EvalSettings(actors=n, **base), str(tmp_path / str(n)), lm=pool)
    for task in ("arc_easy", "hellaswag", "gsm8k"):
        assert results[1]["tasks"][task]["all"] == results[2]["tasks"][task]["all"]
        one = [json.loads(line) for line in open(results[1]["files"][task])]
        two = [json.loads(line) for line in open(results[2]["files"][task])]
        assert [r["resps"] for r in one] == [r["resps"] for r in two]  # every number, bit for bit
    # and the same batches as RaylmLM in this process, with the actors' one thread
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = evaluate_checkpoint(checkpoint, EvalSettings(**base), str(tmp_path / "local"),
                                    lm=RaylmLM(checkpoint=checkpoint, batch_size=2))
    finally:
        torch.set_num_threads(threads)
    for task in ("arc_easy", "hellaswag", "gsm8k"):
        assert local["tasks"][task]["all"] == results[1]["tasks"][task]["all"]


def test_humaneval_is_refused_without_the_fence(shared_data, checkpoint, tmp_path, monkeypatch):
    from raylm.eval import sandbox

    monkeypatch.setitem(sandbox._probe, "report", "error mount_setattr(/, read-only, recursive) failed: "
                                                  "Operation not permitted (errno 1)")
    monkeypatch.delenv("RAYLM_SANDBOX_ALLOW_WEAK", raising=False)
    settings = EvalSettings(tasks=["humaneval"], limit=1, benchmark_data=_bench(shared_data), allow_code_execution=True)
    with pytest.raises(sandbox.SandboxUnavailable, match="mount_setattr.*sandbox_allow_weak"):
        evaluate_checkpoint(checkpoint, settings, str(tmp_path), lm=object())
    sandbox.allow_code_execution(False)


def test_bits_per_byte_of_text_files_with_the_same_name_are_kept_apart(lm, tmp_path):
    from raylm.eval.suite import bits_per_byte_of_files, text_file_labels

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second, val = tmp_path / "a" / "val.txt", tmp_path / "b" / "val.txt", tmp_path / "split.txt"
    first.write_text("The cat sat on the mat. " * 4)
    second.write_text("def add(a, b):\n    return a + b\n" * 4)
    val.write_text("Water boils at 100 degrees. " * 4)
    paths = [str(first), str(second), str(val)]
    assert text_file_labels(paths, {str(val): "val"}) == {str(first): str(first), str(second): str(second),
                                                          str(val): "val"}
    assert text_file_labels([str(first), str(val)], {str(val): "val"})[str(first)] == "val.txt"
    figures = bits_per_byte_of_files(lm, paths, {str(val): "val"})
    assert set(figures) == {f"bpb/{first}", f"bpb/{second}", "bpb/val"}
    assert figures[f"bpb/{first}"]["file"] == str(first)
    assert figures[f"bpb/{first}"]["bpb"] != figures[f"bpb/{second}"]["bpb"]

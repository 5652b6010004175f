"""The fine-tuning layouts (messages, prompt/completion, prompt/response, ShareGPT, Alpaca, text) read into the
same turns from jsonl, a JSON array, parquet and compressed files; `auto`, named formats, column mappings; the
refusal of data that fits no layout (before Ray: the CLI exits 2 with one line); bad rows named by file:line."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from raylm.config import ConfigError, validate_config
from raylm.data.chat import ChatDataError, read_chat
from raylm.data.chat_layouts import LayoutError, choose_format, first_records

SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "Add two and three."}
ASSISTANT = {"role": "assistant", "content": "Five."}

# One conversation in every layout: each must read to the same turns.
SAME_CONVERSATION = {
    "messages": {"messages": [USER, ASSISTANT]},
    "prompt_completion": {"prompt": "Add two and three.", "completion": "Five."},
    "prompt_completion_conversational": {"prompt": [USER], "completion": [ASSISTANT]},
    "prompt_response": {"prompt": "Add two and three.", "response": "Five."},
    "sharegpt": {"conversations": [{"from": "human", "value": "Add two and three."}, {"from": "gpt", "value": "Five."}]},
    "sharegpt_user_assistant": {"conversations": [{"from": "user", "value": "Add two and three."},
                                                  {"from": "assistant", "value": "Five."}]},
    "alpaca": {"instruction": "Add two and three.", "input": "", "output": "Five."},
    "alpaca_no_input": {"instruction": "Add two and three.", "output": "Five."},
}


def write(path, rows, kind: str = "jsonl") -> str:
    path = str(path)
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    text = json.dumps(rows) if kind == "json" else "".join(json.dumps(row) + "\n" for row in rows)
    data = text.encode()
    if path.endswith(".gz"):
        data = gzip.compress(data)
    elif path.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    with open(path, "wb") as handle:
        handle.write(data)
    return path


@pytest.mark.parametrize("name", sorted(SAME_CONVERSATION))
def test_every_layout_reads_to_the_same_turns(tmp_path, name):
    path = write(tmp_path / "data.jsonl", [SAME_CONVERSATION[name]] * 2)
    expected_layout = name.split("_conversational")[0].split("_user_")[0].removesuffix("_no_input")
    assert choose_format(path, "auto") == expected_layout
    rows = list(read_chat(path))
    assert [row.turns for row in rows] == [[USER, ASSISTANT]] * 2
    assert {row.layout for row in rows} == {expected_layout}
    # the named format reads it the same way
    assert [row.turns for row in read_chat(path, layout=expected_layout)] == [[USER, ASSISTANT]] * 2


@pytest.mark.parametrize("kind, name", [("json", "data.json"), ("parquet", "data.parquet"), ("jsonl", "data.jsonl.gz"),
                                        ("jsonl", "data.jsonl.zst"), ("json", "data.json.gz")])
def test_files_of_every_kind(tmp_path, kind, name):
    rows = [{"instruction": f"Add {n} and 1.", "input": "", "output": f"{n + 1}."} for n in range(5)]
    path = write(tmp_path / name, rows, kind)
    assert choose_format(path, "auto") == "alpaca"
    read = list(read_chat(path))
    assert [row.turns[1]["content"] for row in read] == [f"{n + 1}." for n in range(5)]
    assert read[2].where.startswith(path) and ("[2]" in read[2].where or ":3" in read[2].where)


def test_alpaca_input_follows_the_instruction_after_a_blank_line_and_system_prompt(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"instruction": "Translate.", "input": "bonjour", "output": "hello"},
                                        {"instruction": "Say hi.", "input": "  ", "output": "hi"}])
    first, second = read_chat(path, system_prompt="Be brief.")
    assert first.turns == [SYSTEM, {"role": "user", "content": "Translate.\n\nbonjour"},
                           {"role": "assistant", "content": "hello"}]
    assert second.turns[1] == {"role": "user", "content": "Say hi."}


def test_sharegpt_system_and_several_turns(tmp_path):
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "a"},
                             {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    (read,) = read_chat(write(tmp_path / "s.jsonl", [row]))
    assert [turn["role"] for turn in read.turns] == ["system", "user", "assistant", "user", "assistant"]


def test_columns_map_other_names(tmp_path):
    path = write(tmp_path / "qa.jsonl", [{"question": "2+3?", "answer": "5"}])
    with pytest.raises(LayoutError, match=r"keys \['answer', 'question'\] match no fine-tuning layout"):
        choose_format(path, "auto")
    columns = {"prompt": "question", "response": "answer"}
    assert choose_format(path, "auto", columns) == "prompt_response"
    (row,) = read_chat(path, columns=columns)
    assert row.turns == [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]


def test_columns_config_names_the_key():
    with pytest.raises(ConfigError, match=r"finetune.columns.*\['question'\]"):
        validate_config({"finetune": {"columns": {"question": "q"}}})
    assert validate_config({"finetune": {"columns": {"prompt": "q"}}}).finetune.columns == {"prompt": "q"}
    with pytest.raises(ConfigError, match=r"finetune.format"):
        validate_config({"finetune": {"format": "dolly"}})


def test_text_rows_and_plain_files_are_text_and_named_formats_are_checked(tmp_path):
    assert choose_format(write(tmp_path / "t.jsonl", [{"text": "plain"}]), "auto") == "text"
    (tmp_path / "t.txt").write_text("plain text")
    assert choose_format(str(tmp_path / "t.txt"), "auto") == "text"
    with pytest.raises(LayoutError, match=r"finetune.format = 'alpaca' needs a .jsonl"):
        choose_format(str(tmp_path / "t.txt"), "alpaca")
    pairs = write(tmp_path / "p.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(LayoutError, match=r"finetune.format = 'sharegpt' needs the keys \['conversations'\] but the "
                                          r"first row has the keys \['prompt', 'response'\]"):
        choose_format(pairs, "sharegpt")
    with pytest.raises(LayoutError, match="match no fine-tuning layout"):  # chat: never text
        choose_format(write(tmp_path / "t2.jsonl", [{"text": "plain"}]), "chat")


def test_unknown_layout_is_one_line_naming_file_keys_and_layouts(tmp_path):
    path = write(tmp_path / "odd.json", [{"question": "q", "solution": "s"}], "json")
    with pytest.raises(LayoutError) as caught:
        choose_format(path, "auto")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(path)
    assert "['question', 'solution']" in message
    for layout in ("messages", "prompt+completion", "prompt+response", "ShareGPT", "Alpaca", "text"):
        assert layout in message


@pytest.mark.parametrize("name", ["cut.jsonl.gz", "cut.jsonl.zst"])
def test_a_truncated_compressed_file_is_refused_naming_the_file_and_where_it_broke(tmp_path, name):
    rows = [{"prompt": f"Add {n} and 1.", "response": f"{n + 1}."} for n in range(2000)]
    path = write(tmp_path / name, rows)
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(LayoutError) as caught:
        list(read_chat(path))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(path) and "truncated" in message


@pytest.mark.parametrize("row, expected", [
    ({"instruction": "a", "output": None}, "no assistant turn"),
    ({"instruction": "a", "input": 3, "output": "b"}, "`input` is a int"),
    ({"prompt": "a", "completion": 7}, "no assistant turn: `completion` is a int"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}, "roles out of order"),
    ({"conversations": [{"from": "bing", "value": "a"}]}, "conversations[0].from = 'bing'"),
    ({"conversations": [{"from": "human", "value": "a"}]}, "no assistant turn"),
    ({"conversations": []}, "no assistant turn"),
    ({"messages": [USER, USER, ASSISTANT]}, "roles out of order at messages[1]"),
])
def test_bad_rows_are_named_by_file_and_line(tmp_path, row, expected):
    good = {"instruction": "a", "output": "b"}
    path = write(tmp_path / "bad.jsonl", [good, row, good])
    with pytest.raises(ChatDataError) as caught:
        list(read_chat(path))
    assert f"{path}:2: " in str(caught.value) and expected in str(caught.value)
    assert "1 bad chat row" in str(caught.value)


def test_first_records_reads_only_the_start(tmp_path):
    path = write(tmp_path / "many.jsonl", [{"prompt": str(n), "response": "x"} for n in range(1000)])
    assert [row["prompt"] for row in first_records(path, 3)] == ["0", "1", "2"]


def test_cli_refuses_unknown_layout_before_ray_in_one_line(tmp_path):
    """`raylm finetune` on records of no layout: exit 2, one line, no Ray, well under ten seconds."""
    path = write(tmp_path / "odd.jsonl", [{"question": "q", "solution": "s"}] * 200)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "raylm", "finetune", "--from", str(tmp_path / "none"),
                           "--set", f"finetune.data={path}", "--workspace", str(tmp_path / "ws")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()}, cwd=os.getcwd())
    seconds = time.perf_counter() - started
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("raylm:")]
    assert len(lines) == 1 and "odd.jsonl" in lines[0] and "['question', 'solution']" in lines[0], done.stderr
    assert "Started a local Ray" not in done.stderr and "ray.init" not in done.stderr
    assert not (tmp_path / "ws").exists()
    assert seconds < 10, seconds


def test_real_public_question_answer_set_through_a_column_mapping(shared_data):
    """No instruction set is in shared/data; GSM8K's `{"question", "answer"}` rows are the real-data case of
    `finetune.columns` (and of the refusal without it)."""
    path = str(shared_data / "benchmarks" / "gsm8k" / "test.jsonl")
    if not os.path.exists(path):
        pytest.skip(f"{path} is absent from the shared data folder")
    with pytest.raises(LayoutError, match=r"\['answer', 'question'\] match no fine-tuning layout"):
        choose_format(path, "auto")
    columns = {"prompt": "question", "response": "answer"}
    assert choose_format(path, "auto", columns) == "prompt_response"
    rows = []
    for row in read_chat(path, layout="prompt_response", columns=columns):
        rows.append(row)
        if len(rows) == 300:
            break
    assert len(rows) == 300 and rows[299].where == f"{path}:300"
    assert all(row.turns[1]["content"].split("#### ")[-1].strip().lstrip("-").replace(",", "").isdigit() for row in rows)


def test_huggingface_dataset_with_layout_columns(tmp_path, monkeypatch):
    """`hf://` goes through `datasets.load_dataset` (a local dataset folder here: no network)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "hfset"
    folder.mkdir()
    write(folder / "train.parquet", [SAME_CONVERSATION["sharegpt"]] * 4, "parquet")
    assert choose_format(f"hf://{folder}", "auto") == "sharegpt"
    rows = list(read_chat(f"hf://{folder}"))
    assert [row.turns for row in rows] == [[USER, ASSISTANT]] * 4 and rows[3].where == f"hf://{folder}[3]"
    with pytest.raises(LayoutError, match=r"finetune.data 'hf://.*:nosuchsplit' cannot be loaded"):
        choose_format(f"hf://{folder}:nosuchsplit", "auto")

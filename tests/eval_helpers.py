"""A tiny real raylm checkpoint for the evaluation tests: a BPE tokenizer trained on a few texts and a
small randomly initialised transformer, saved through the normal checkpoint code."""

from __future__ import annotations

from pathlib import Path

import torch

from raylm.config import TokenizerConfig
from raylm.data.tokenizer import train_tokenizer
from raylm.model import Transformer, TransformerConfig
from raylm.train.checkpoint import save_checkpoint

TEXTS = [
    "Question: Which gas do plants take in? Answer: carbon dioxide. The sun is a star.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "A man is sitting on a roof. He starts pulling up roofing. The answer is 42. #### 42",
    "Water boils at 100 degrees. The cat sat on the mat. Ice melts when it gets warm.",
] * 20


def make_checkpoint(directory: Path, seq_len: int = 128, d_model: int = 32, n_layers: int = 2,
                    vocab_size: int = 400, seed: int = 0) -> Path:
    tokenizer = train_tokenizer(TEXTS, TokenizerConfig(vocab_size=vocab_size, min_frequency=1))
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=tokenizer.get_vocab_size(), d_model=d_model, n_layers=n_layers,
                               n_heads=4, seq_len=seq_len)
    model = Transformer(config)
    with torch.no_grad():  # larger weights than the init, so that choices get clearly different scores
        for param in model.parameters():
            if param.dim() >= 2:
                param.mul_(8)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(str(directory), model, optimizer, {"step": 0}, config.to_dict(), tokenizer.to_str(), rank=0)
    return directory


def write_long_quiz(path: Path, long_choice: bool = True) -> Path:
    """An ARC-layout quiz whose items outgrow a small model's context: one short item, one whose question
    is far longer than the window (its context is left-truncated) and, with `long_choice`, one whose
    choice alone is longer than the window (scored in windows)."""
    import json

    rows = [{"query": "Question: Which gas do plants take in?", "choices": [" carbon dioxide", " oxygen"], "gold": 0},
            {"query": "Question: " + "Water boils at 100 degrees. The cat sat on the mat. " * 30 + "Why?",
             "choices": [" it is warm", " ice melts"], "gold": 0}]
    if long_choice:
        rows.append({"query": "Question: What did the cat do?",
                     "choices": [" The cat sat on the mat. " * 40, " nothing"], "gold": 0})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


LONG = "Water boils at 100 degrees. The cat sat on the mat. " * 30  # far longer than a small model's window


def write_shapes(folder: Path) -> tuple[list[dict], list[str], list[str]]:
    """One small benchmark in every scoring shape a user can add by configuration (issue 21), each in a
    jsonl variant that needs `fields` and each with one item longer than the context:
    (eval.extra_tasks, eval.task_paths, task names)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)

    def jsonl(name: str, rows: list[dict]) -> str:
        path = folder / name
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)

    piqa = jsonl("piqa.jsonl", [  # PIQA's layout: goal, sol1, sol2, label
        {"goal": "To boil water,", "sol1": "heat it to 100 degrees.", "sol2": "put it on the mat.", "label": 0},
        {"goal": LONG + "So the cat", "sol1": "sat on the mat.", "sol2": "boils at 100 degrees.", "label": 0},
        {"goal": "Ice melts", "sol1": "when it gets warm.", "sol2": "when the cat sits.", "label": 1}])
    wino = jsonl("wino.jsonl", [  # WinoGrande's answer "1" / "2", contexts already split at the blank
        {"options": ["The cat sat on the mat because the cat", "The cat sat on the mat because the mat"],
         "rest": "was warm.", "answer": "1"},
        {"options": [LONG + "The sun", LONG + "The ice"], "rest": "is a star.", "answer": "1"},
        {"options": ["Plants take in carbon", "Plants take in water"], "rest": "dioxide.", "answer": "1"}])
    lambada = jsonl("lambada.jsonl", [
        {"prefix": "The cat sat on the", "word": "mat"},
        {"prefix": LONG + "Water boils at 100", "word": "degrees"},
        {"prefix": "Ice melts when it gets", "word": "warm"}])
    gsm = jsonl("gsm.jsonl", [
        {"problem": "What is 40 plus 2?", "solution": "40 + 2 = 42. #### 42"},
        {"problem": LONG + "How many degrees?", "solution": "#### 100"},
        {"problem": "What is 2 plus 3?", "solution": "2 + 3 = 5 #### 5"}])
    # an lm-eval task YAML of the user's own, its data beside it (a relative path)
    jsonl("yes_no.jsonl", [{"text": "Water boils at 100 degrees.", "label": 0},
                           {"text": LONG + "The cat sat on the mat.", "label": 1},
                           {"text": "Ice melts when it gets warm.", "label": 0}])
    (folder / "yaml").mkdir(exist_ok=True)
    (folder / "yaml" / "yes_no.yaml").write_text(
        "task: yes_no\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: ../yes_no.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{text}}\\nTrue or false?\"\n"
        "doc_to_choice: [\"true\", \"false\"]\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n")
    extra = [
        {"name": "my_piqa", "layout": "arc", "path": piqa,
         "fields": {"query": "goal", "choices": ["sol1", "sol2"], "gold": "label"}},
        {"name": "my_wino", "layout": "partial", "path": wino, "gold_base": 1,
         "fields": {"context_options": "options", "continuation": "rest", "gold": "answer"}},
        {"name": "my_lambada", "layout": "cloze", "path": lambada,
         "fields": {"context": "prefix", "continuation": "word"}},
        {"name": "my_gsm", "layout": "generation", "path": gsm, "answer_pattern": "#### (\\d+)",
         "fields": {"query": "problem", "answer": "solution"}},
    ]
    return extra, [str(folder / "yaml")], ["my_piqa", "my_wino", "my_lambada", "my_gsm", "yes_no"]

"""MT-Bench: two-turn answers generated and saved; judged only when a judge model is configured.

The model answers each question's first turn, then its second turn with the first exchange in its
context (a plain `### User:` / `### Assistant:` transcript, as a base model has no chat template).
Answers are saved as jsonl. With `eval.judge_url` (an OpenAI-compatible `/chat/completions`
endpoint) each turn is graded 1-10 with MT-Bench's own single-answer judge prompts (the math
prompts, with the reference answer, for math, reasoning and coding); without one the result says
`scored: false` and no score is reported.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from pathlib import Path
from typing import Any

from lm_eval.api.instance import Instance

from raylm.data.benchmarks import read_mt_bench

USER, ASSISTANT = "### User:\n", "### Assistant:\n"
STOP = ["### User:", "\n### "]
REFERENCE_CATEGORIES = {"math", "reasoning", "coding"}
RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")


def turn_prompt(turns: list[str], answers: list[str]) -> str:
    parts = []
    for i, question in enumerate(turns):
        parts.append(f"{USER}{question}\n\n{ASSISTANT}")
        if i < len(answers):
            parts[-1] += f"{answers[i]}\n\n"
    return "".join(parts)


def generate_answers(lm: Any, questions: list[dict[str, Any]], max_gen_toks: int = 256) -> list[dict[str, Any]]:
    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(2):
        requests = [Instance("generate_until", {}, (turn_prompt(q["turns"][:turn + 1], answers[i]),
                                                    {"until": STOP, "max_gen_toks": max_gen_toks}), i)
                    for i, q in enumerate(questions)]
        for i, text in enumerate(lm.generate_until(requests)):
            answers[i].append(text.strip())
    return [{"question_id": q["question_id"], "category": q.get("category"), "turns": q["turns"],
             "answers": a, "raylm_id": q["raylm_id"]} for q, a in zip(questions, answers)]


def load_questions(benchmark_dir: str, limit: int | None = None) -> list[dict[str, Any]]:
    path = Path(benchmark_dir) / "mt_bench" / "question.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"MT-Bench questions not found at {path}")
    items = list(read_mt_bench(path))[:limit]
    return [{**item.record, "raylm_id": item.item_id} for item in items]


def _judge_prompts(benchmark_dir: str) -> dict[str, dict[str, Any]]:
    with open(Path(benchmark_dir) / "mt_bench" / "judge_prompts.jsonl", encoding="utf-8") as handle:
        return {p["name"]: p for p in map(json.loads, filter(str.strip, handle))}


def _references(benchmark_dir: str) -> dict[int, list[str]]:
    path = Path(benchmark_dir) / "mt_bench" / "reference_answer" / "gpt-4.jsonl"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as handle:
        return {r["question_id"]: r["choices"][0]["turns"] for r in map(json.loads, filter(str.strip, handle))}


def ask_judge(url: str, model: str, system: str, prompt: str, api_key: str | None = None, timeout: float = 120) -> str:
    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 1024,
                       "messages": [{"role": "system", "content": system}, {"role": "user", "content": prompt}]})
    request = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())["choices"][0]["message"]["content"]


def judge_answers(records: list[dict[str, Any]], benchmark_dir: str, url: str, model: str = "gpt-4",
                  api_key: str | None = None) -> list[dict[str, Any]]:
    prompts, references = _judge_prompts(benchmark_dir), _references(benchmark_dir)
    for record in records:
        reference = references.get(record["question_id"]) if record.get("category") in REFERENCE_CATEGORIES else None
        q, a = record["turns"], record["answers"]
        ratings = []
        for turn in range(2):
            name = ("single-math-v1" if reference else "single-v1") + ("-multi-turn" if turn else "")
            template = prompts[name]
            fields = {"question": q[0], "answer": a[0], "question_1": q[0], "question_2": q[1],
                      "answer_1": a[0], "answer_2": a[1]}
            if reference:
                fields.update(ref_answer_1=reference[0], ref_answer_2=reference[1] if len(reference) > 1 else "")
            reply = ask_judge(url, model, template["system_prompt"], template["prompt_template"].format(**fields), api_key)
            found = RATING.search(reply)
            ratings.append(float(found.group(1)) if found else None)
        record["ratings"] = ratings
    return records


def run_mt_bench(lm: Any, benchmark_dir: str, out_path: str, limit: int | None = None, judge_url: str | None = None,
                 judge_model: str = "gpt-4", max_gen_toks: int = 256) -> dict[str, Any]:
    records = generate_answers(lm, load_questions(benchmark_dir, limit), max_gen_toks)
    scored = bool(judge_url)
    if scored:
        records = judge_answers(records, benchmark_dir, judge_url, judge_model, os.environ.get("RAYLM_JUDGE_API_KEY"))
    with open(out_path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    summary: dict[str, Any] = {"n_items": len(records), "scored": scored, "answers": out_path}
    if scored:
        for turn in range(2):
            values = [r["ratings"][turn] for r in records if r["ratings"][turn] is not None]
            summary[f"score_turn{turn + 1}"] = sum(values) / len(values) if values else float("nan")
        every = [v for r in records for v in r["ratings"] if v is not None]
        summary["score"] = sum(every) / len(every) if every else float("nan")
    else:
        summary["note"] = "UNSCORED: answers generated and saved; set eval.judge_url to have a judge model score them"
    return summary

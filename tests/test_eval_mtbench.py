"""MT-Bench judging against a real local HTTP server speaking the OpenAI chat-completions shape."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from raylm.eval.mtbench import judge_answers, turn_prompt


class Judge(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Judge.seen.append({"path": self.path, **body})
        rating = 3 if "Reference" in body["messages"][1]["content"] else 8
        reply = json.dumps({"choices": [{"message": {"content": f"Fine. Rating: [[{rating}]]"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_judge_scores_both_turns_with_mt_bench_prompts(shared_data):
    server = HTTPServer(("127.0.0.1", 0), Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        records = [{"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."],
                    "answers": ["Roses.", "Red."]},
                   {"question_id": 111, "category": "math", "turns": ["What is 2+2?", "And 3+3?"],
                    "answers": ["4", "6"]}]
        judged = judge_answers(records, str(shared_data / "benchmarks"), f"http://127.0.0.1:{server.server_port}/v1")
    finally:
        server.shutdown()
    assert judged[0]["ratings"] == [8.0, 8.0]
    assert judged[1]["ratings"] == [3.0, 3.0]  # math: the judge gets the reference answer
    assert all(call["path"] == "/v1/chat/completions" for call in Judge.seen) and len(Judge.seen) == 4
    assert "Roses." in Judge.seen[0]["messages"][1]["content"]


def test_second_turn_prompt_holds_the_first_exchange():
    prompt = turn_prompt(["Q1", "Q2"], ["A1"])
    assert prompt == "### User:\nQ1\n\n### Assistant:\nA1\n\n### User:\nQ2\n\n### Assistant:\n"

"""Evaluation progress on the console: per request type, the tasks and their request counts, then how
many rows are scored (at most every few seconds), then the time taken.

lm-eval asks a model once per request type for all tasks together, so this is where progress is
known. Records go to the `raylm.progress` logger, which reaches the console even while lm-eval's own
output is sent to the run log (`raylm.failure.chatter_to_log`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

LOGGER = "raylm.progress"
PROGRESS_BATCHES = 8  # batches run between two progress updates
SHOWN_TASKS = 8  # tasks named in a request-count line
log = logging.getLogger(LOGGER)
log.setLevel(logging.INFO)  # shown whatever the root's level: progress is what the console is for


class Progress:
    def __init__(self, kind: str, requests: list[Any], rows: int | None = None, every_s: float = 10.0):
        counts = Counter(getattr(r, "task_name", None) or "(untasked)" for r in requests)
        shown = list(counts.items())[:SHOWN_TASKS]
        tasks = ", ".join(f"{task} {count}" for task, count in shown)
        if len(counts) > SHOWN_TASKS:  # MMLU alone is 57 subjects
            rest = len(requests) - sum(count for _, count in shown)
            tasks += f" and {len(counts) - SHOWN_TASKS} more tasks {rest}"
        log.info("eval: %s: %d requests (%s)", kind, len(requests), tasks)
        self.kind, self.rows, self.done, self.every_s = kind, rows or len(requests), 0, every_s
        self.started = self.last = time.perf_counter()

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self.last >= self.every_s and self.done < self.rows:
            log.info("eval: %s: %d/%d rows scored, %.0f s", self.kind, self.done, self.rows, now - self.started)
            self.last = now

    def finish(self) -> None:
        log.info("eval: %s: done in %.1f s", self.kind, time.perf_counter() - self.started)

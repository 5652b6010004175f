"""What a run shows on the console: raylm's own lines and a live training progress line; Ray's chatter goes
to the run log.

Unless `--verbose`, Ray's and Ray Data's console loggers show warnings and errors only (their INFO records,
dataset plans and progress still reach the run log, `raylm.failure`), Ray Data draws no progress bars, and
the output of Ray's workers and controllers (Ray Train's per-report lines among them) is not forwarded to the
driver: it stays in Ray's session logs, whose folder the run log names.

Training progress comes from the MLflow run that rank 0 logs to: a thread on the driver reads the run's
latest figures every few seconds and prints step, loss, val loss, tokens/s, MFU and the time left. On a
terminal the line is rewritten in place; otherwise (a file, `ray job logs`) a plain line is printed at most
every `PLAIN_EVERY_S` seconds and whenever a new val loss arrives.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

log = logging.getLogger("raylm")

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
PROGRESS_FIGURES = ("tokens_seen", "loss", "val_loss", "tokens_per_s", "mfu", "budget_max_steps")
POLL_S = 2.0
PLAIN_EVERY_S = 15.0


def quiet_ray() -> None:
    """Ray's console records at WARNING and above only; no Ray Data progress bars (the run log keeps INFO)."""
    # deferred: pulls in ray.data, slow to import; only a run that starts Ray needs it
    import ray.data

    for name in RAY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.WARNING)
                if _known_notice not in handler.filters:
                    handler.addFilter(_known_notice)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False


PROGRESS_BARS_OFF = {"TQDM_DISABLE": "1",  # lm-eval's and others' tqdm bars
                     "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # datasets' "Generating test split"
                     "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # artifact downloads
                     "MLFLOW_LOGGING_LEVEL": "WARNING"}  # "Creating initial MLflow database tables..."


def quiet_progress_bars() -> None:
    """Libraries' own progress bars off (a setting the user made in the environment stays)."""
    for name, value in PROGRESS_BARS_OFF.items():
        os.environ.setdefault(name, value)


def ours_or_warning(record: logging.LogRecord) -> bool:
    """On the console: raylm's records, and other libraries' (lm-eval, MLflow, ...) warnings and errors."""
    return record.name.split(".")[0] == "raylm" or record.levelno >= logging.WARNING


# Warnings Ray prints on every run that tell the user nothing to act on (the run log keeps them): Ray Data's
# that its progress bars are off (we turned them off), Ray's that token authentication is on (its default).
KNOWN_NOTICES = ("Progress bars disabled", "Token authentication is enabled for this Ray cluster")


def _known_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(KNOWN_NOTICES)


def duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `42s`."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress_line(what: str, figures: dict[str, float], max_steps: int | None, elapsed_s: float,
                  steps_done_in_elapsed: int) -> str:
    """`pretrain step 40/120 (33%) loss 5.12 val 5.30 | 30,120 tok/s MFU 18.1% | 0m42s left`; without a step
    count yet (a minutes budget still timing its first steps), `pretrain step 4 loss ...` and no time left."""
    step = int(figures.get("step", 0))
    parts = [f"{what} step {step}/{max_steps} ({100 * step / max(max_steps, 1):.0f}%)" if max_steps
             else f"{what} step {step}"]
    if "loss" in figures and figures["loss"] == figures["loss"]:  # not NaN
        parts.append(f"loss {figures['loss']:.3f}")
    if "val_loss" in figures and figures["val_loss"] == figures["val_loss"]:
        parts.append(f"val {figures['val_loss']:.3f}")
    line = " ".join(parts)
    speed = []
    if figures.get("tokens_per_s"):
        speed.append(f"{figures['tokens_per_s']:,.0f} tok/s")
    if figures.get("mfu"):
        speed.append(f"MFU {100 * figures['mfu']:.1f}%")
    if speed:
        line += " | " + " ".join(speed)
    if max_steps and steps_done_in_elapsed > 0 and step < max_steps:
        line += f" | {duration(elapsed_s / steps_done_in_elapsed * (max_steps - step))} left"
    return line


class TrainingProgress:
    """While a trainer runs, print its progress from the MLflow run `run_id` (rank 0 logs there). The step is
    the run's `tokens_seen` over the tokens of one optimizer step; the step count is `max_steps`, or what a
    minutes budget fixed once it has timed its first steps (the run's `budget_max_steps`)."""

    def __init__(self, what: str, tracking_uri: str | None, run_id: str | None, max_steps: int | None,
                 tokens_per_step: int, stream: TextIO | None = None, poll_s: float = POLL_S):
        self.what, self.tracking_uri, self.run_id, self.max_steps = what, tracking_uri, run_id, max_steps
        self.tokens_per_step = max(1, tokens_per_step)
        self.stream = stream or sys.stderr
        self.poll_s = poll_s
        self.live = self.stream.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lines: list[str] = []

    def __enter__(self) -> "TrainingProgress":
        if self.run_id and self.tracking_uri:
            self._thread = threading.Thread(target=self._watch, name="raylm-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.live and self.lines:
            self.stream.write("\n")
            self.stream.flush()

    def _watch(self) -> None:
        # deferred: pulls in mlflow, slow to import; only a run with a tracking store needs it
        from raylm import tracking

        client = tracking.client(self.tracking_uri)
        first: tuple[float, int] | None = None
        shown_step, shown_val, shown_at = -1, None, 0.0
        while not self._stop.wait(self.poll_s):
            try:
                figures = tracking.latest_figures(client, self.run_id, PROGRESS_FIGURES)
            except Exception as error:  # noqa: BLE001 - progress is best effort; the run goes on without it
                log.debug("progress: cannot read run %s: %s", self.run_id, error)
                continue
            step = int(round(figures.get("tokens_seen", 0) / self.tokens_per_step))  # reported with every window
            if step <= 0 or step == shown_step:
                continue
            now = time.monotonic()
            first = first or (now, step)
            figures = {**figures, "step": step}
            max_steps = int(figures["budget_max_steps"]) if figures.get("budget_max_steps") else self.max_steps
            line = progress_line(self.what, figures, max_steps, now - first[0], step - first[1])
            new_val = figures.get("val_loss") != shown_val
            if self.live:
                self.stream.write("\r" + line.ljust(100)[:160])
            elif new_val or now - shown_at >= PLAIN_EVERY_S:
                self.stream.write(line + "\n")
                shown_at = now
            else:
                continue
            self.stream.flush()
            self.lines.append(line)
            shown_step, shown_val = step, figures.get("val_loss")

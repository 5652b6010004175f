"""The report card of one experiment: what was planned, curated, trained, tuned, fine-tuned and scored.

`raylm report` (and the pipeline's last stage) gathers what the finished stages of a config left in the
workspace and in MLflow, and writes `report.md` (figures beside it) and a self-contained `report.html`
(figures embedded as PNG data) into a `report` stage folder and as MLflow artifacts of that stage's run.

Gathering (`collect`) reads only JSON manifests, MLflow metrics and tags, and the final checkpoint through
the safe loader (a few greedy samples); rendering (`render_markdown`, `render_html`) is plain functions
of the gathered `ReportData`, so they test without Ray or MLflow.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("raylm")

SECTIONS = ("plan", "data", "tokenizer", "training", "tuning", "finetuning", "scores", "samples", "lineage")
TITLES = {"plan": "Plan", "data": "Data accounting", "tokenizer": "Tokenizer", "training": "Training",
          "tuning": "Tuning", "finetuning": "Fine-tuning", "scores": "Scores", "samples": "Samples",
          "lineage": "Lineage"}
PLAN_STAGES = ("curate", "tokenize", "pretrain", "eval")


@dataclass
class ReportData:
    """Everything the report shows, gathered once; each field is plain data (tables are lists of rows)."""

    experiment: str
    workspace: str
    plan_table: str = ""
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> manifest
    run_tags: dict[str, dict[str, str]] = field(default_factory=dict)  # stage name -> its MLflow run's tags
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # pretrain metric -> (step, value)
    trials: list[dict[str, Any]] = field(default_factory=list)  # the latest tune sweep's trial rows
    tune_metric: str = "val_loss"
    scores: list[dict[str, Any]] = field(default_factory=list)  # eval summary rows: task, metric, score, clean
    samples: list[tuple[str, str]] = field(default_factory=list)  # (prompt, continuation)

    def metrics(self, stage: str) -> dict[str, float]:
        return self.manifests.get(stage, {}).get("metrics", {})


# ------------------------------------------------------------------------------------------------
# Tables: each section as (header, rows) or text; both renderers use them.


def data_rows(data: ReportData) -> list[tuple[str, str, str]]:
    """(what, rows, bytes) of curation: input, kept, and each reason rows were rejected."""
    figures = data.metrics("curate")
    if not figures:
        return []
    rows = [("input", _count(figures.get("rows_input")), _count(figures.get("bytes_input")))]
    rows.append(("kept", _count(figures.get("rows_kept")), _count(figures.get("bytes.kept"))))
    reasons = sorted(key.removeprefix("rows.") for key in figures if key.startswith("rows.") and key != "rows.kept")
    for reason in reasons:
        rows.append((f"rejected: {reason}", _count(figures[f"rows.{reason}"]), _count(figures.get(f"bytes.{reason}"))))
    return rows


def pii_rows(data: ReportData) -> list[tuple[str, str]]:
    figures = data.metrics("curate")
    return [(key.removeprefix("pii."), _count(value)) for key, value in sorted(figures.items()) if key.startswith("pii.")]


def dedup_line(data: ReportData) -> str:
    figures = data.metrics("curate")
    if "near_dup.clusters" not in figures:
        return ""
    return (f"near-duplicate clusters {_count(figures['near_dup.clusters'])} "
            f"({_count(figures.get('near_dup.pairs'))} candidate pairs; MinHash LSH, "
            f"{_count(figures.get('near_dup.bands'))} bands x {_count(figures.get('near_dup.rows_per_band'))} rows)")


def tokenizer_rows(data: ReportData) -> list[tuple[str, str]]:
    manifest = data.manifests.get("tokenize")
    if not manifest:
        return []
    figures = manifest.get("metrics", {})
    tokenizer = manifest.get("tokenizer", {})
    return [("vocabulary", _count(tokenizer.get("vocab_size"))), ("source", str(tokenizer.get("source", ""))),
            ("bytes per token (val)", _number(figures.get("val_bytes_per_token"))),
            ("train tokens", _count(figures.get("train_tokens"))), ("val tokens", _count(figures.get("val_tokens"))),
            ("sequence length", _count(manifest.get("seq_len"))), ("packing", str(manifest.get("packing", ""))),
            ("train fill", _percent(figures.get("train_fill")))]


def training_rows(data: ReportData) -> list[tuple[str, str]]:
    figures = data.metrics("pretrain")
    if not figures:
        return []
    model = data.manifests["pretrain"].get("model", {})
    shape = f"{model.get('arch')} {model.get('n_layers')} layers, d_model {model.get('d_model')}, " \
            f"{model.get('n_heads')} heads, seq_len {model.get('seq_len')}"
    return [("model", shape), ("steps", _count(figures.get("step"))), ("tokens seen", _count(figures.get("tokens_seen"))),
            ("val loss", f"{_number(figures.get('val_loss_initial'))} -> {_number(figures.get('val_loss'))}"),
            ("val bits-per-byte", _number(figures.get("val_bpb"))),
            ("tokens/s (last window)", _count(figures.get("tokens_per_s"))), ("MFU", _percent(figures.get("mfu"))),
            ("workers", _count(figures.get("workers"))), ("restarts", _count(figures.get("restarts"))),
            ("wall time", f"{figures.get('stage_seconds', 0):.0f} s")]


def tuning_rows(data: ReportData) -> list[tuple[str, ...]]:
    rows = []
    for trial in sorted(data.trials, key=lambda t: (t.get("metric") is None, t.get("metric") or 0)):
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in sorted(trial.get("params", {}).items()))
        outcome = "error" if trial.get("error") else "stopped early" if trial.get("stopped_early") else "finished"
        rows.append((str(trial.get("trial_id", "")), params, _number(trial.get("metric")), _count(trial.get("step")), outcome))
    return rows


def finetune_rows(data: ReportData) -> list[tuple[str, str]]:
    manifest = data.manifests.get("finetune")
    if not manifest:
        return []
    figures = manifest.get("metrics", {})
    return [("method", str(manifest.get("method", ""))), ("base", str(manifest.get("base", {}).get("checkpoint", ""))),
            ("val loss before -> after",
             f"{_number(figures.get('val_loss_before'))} -> {_number(figures.get('val_loss_after'))}"),
            ("trainable parameters", f"{_count(figures.get('params_trainable'))} of {_count(figures.get('params_total'))}"),
            ("steps", _count(figures.get("step")))]


def score_rows(data: ReportData) -> list[tuple[str, str, str, str]]:
    """(task, metric, all items, clean items) for the benchmark tasks, then held-out bits-per-byte."""
    rows = [(str(r.get("task", "")), str(r.get("metric", "")), _number(r.get("score")), _number(r.get("clean")))
            for r in data.scores]
    held_out = data.metrics("eval")
    if held_out:
        rows.append(("held-out val split", "bits_per_byte", _number(held_out.get("val_bpb")), ""))
    return rows


def lineage_rows(data: ReportData) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for stage, manifest in data.manifests.items():
        tags = data.run_tags.get(stage, {})
        rows.append((stage, manifest.get("fingerprint", ""), tags.get("raylm.config_hash", ""),
                     (manifest.get("code_version") or "")[:12], manifest.get("mlflow_run_id") or ""))
    return rows


# ------------------------------------------------------------------------------------------------
# Figures (matplotlib, PNG bytes)


def figures(data: ReportData) -> dict[str, bytes]:
    """name -> PNG of each figure the data allows: loss curves, throughput, tuning's lr vs metric, scores."""
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pulls in matplotlib, slow to import; only this path needs it
    import matplotlib.pyplot as plt

    made: dict[str, bytes] = {}

    def save(name: str, figure) -> None:
        buffer = io.BytesIO()
        figure.tight_layout()
        figure.savefig(buffer, format="png", dpi=90)
        plt.close(figure)
        made[name] = buffer.getvalue()

    loss, val = data.curves.get("step_loss", []), data.curves.get("val_loss", [])
    if loss or val:
        figure, axis = plt.subplots(figsize=(6.5, 3.6))
        if loss:
            axis.plot(*zip(*loss), "-", label="train loss")
        if val:
            axis.plot(*zip(*val), "o-", label="val loss", markersize=3)
        axis.set(xlabel="step", ylabel="loss (nats per token)", title="Pretraining loss")
        axis.legend()
        axis.grid(alpha=0.3)
        save("loss.png", figure)
    speed = data.curves.get("tokens_per_s", [])
    if speed:
        figure, axis = plt.subplots(figsize=(6.5, 3.0))
        axis.plot(*zip(*speed), "-", color="tab:green", label="tokens/s")
        axis.set(xlabel="step", ylabel="tokens/s", title="Throughput")
        mfu = data.curves.get("mfu", [])
        if mfu:
            other = axis.twinx()
            other.plot(*zip(*mfu), ":", color="tab:purple", label="MFU")
            other.set_ylabel("MFU")
        axis.grid(alpha=0.3)
        save("throughput.png", figure)
    tried = [t for t in data.trials if t.get("metric") is not None and "train.lr" in t.get("params", {})]
    if tried:
        figure, axis = plt.subplots(figsize=(6.5, 3.2))
        axis.scatter([t["params"]["train.lr"] for t in tried], [t["metric"] for t in tried],
                     c=["tab:red" if t.get("stopped_early") else "tab:blue" for t in tried])
        axis.set_xscale("log")
        axis.set(xlabel="learning rate", ylabel=data.tune_metric, title="Tuning: learning rate vs metric (red: stopped early)")
        axis.grid(alpha=0.3)
        save("tuning.png", figure)
    scored = [r for r in data.scores if isinstance(r.get("score"), (int, float))]
    if scored:
        figure, axis = plt.subplots(figsize=(6.5, 0.5 + 0.35 * len(scored)))
        names = [f"{r['task']} ({r.get('metric', '')})" for r in scored]
        axis.barh(names, [r["score"] for r in scored], color="tab:blue", label="all items")
        clean = [r.get("clean") if isinstance(r.get("clean"), (int, float)) else 0 for r in scored]
        if any(clean):
            axis.barh(names, clean, height=0.4, color="tab:orange", label="clean items")
            axis.legend()
        axis.invert_yaxis()
        axis.set(title="Benchmark scores")
        save("scores.png", figure)
    return made


FIGURE_SECTIONS = {"loss.png": "training", "throughput.png": "training", "tuning.png": "tuning", "scores.png": "scores"}


# ------------------------------------------------------------------------------------------------
# Rendering


def section_bodies(data: ReportData) -> dict[str, list[tuple[str, Any]]]:
    """section -> blocks, each ("table", (header, rows)), ("text", str) or ("pre", str)."""
    bodies: dict[str, list[tuple[str, Any]]] = {name: [] for name in SECTIONS}
    bodies["plan"].append(("pre", data.plan_table) if data.plan_table else ("text", "no plan"))
    if data_rows(data):
        bodies["data"].append(("table", (("rows", "count", "bytes"), data_rows(data))))
        if pii_rows(data):
            bodies["data"].append(("table", (("PII type", "redacted"), pii_rows(data))))
        if dedup_line(data):
            bodies["data"].append(("text", dedup_line(data)))
    for name, rows in (("tokenizer", tokenizer_rows(data)), ("training", training_rows(data)),
                       ("finetuning", finetune_rows(data))):
        if rows:
            bodies[name].append(("table", (("", ""), rows)))
    if data.trials:
        bodies["tuning"].append(("table", (("trial", "params", data.tune_metric, "steps", "outcome"), tuning_rows(data))))
    if score_rows(data):
        bodies["scores"].append(("table", (("task", "metric", "all items", "clean items"), score_rows(data))))
    for prompt, continuation in data.samples:
        bodies["samples"].append(("sample", (prompt, continuation)))
    bodies["lineage"].append(("table", (("stage", "fingerprint", "config hash", "code", "MLflow run"), lineage_rows(data))))
    for name in SECTIONS:
        if not bodies[name]:
            bodies[name].append(("text", f"not run for this config ({_how_to_run(name)})"))
    return bodies


def render_markdown(data: ReportData, figure_names: list[str], figure_folder: str = "figures") -> str:
    lines = [f"# raylm report: {data.experiment}", "", f"Workspace `{data.workspace}`.", ""]
    bodies = section_bodies(data)
    for name in SECTIONS:
        lines += [f"## {TITLES[name]}", ""]
        for kind, block in bodies[name]:
            if kind == "table":
                header, rows = block
                lines.append("| " + " | ".join(header) + " |")
                lines.append("|" + "---|" * len(header))
                lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
            elif kind == "pre":
                lines += ["```", block.rstrip(), "```"]
            elif kind == "sample":
                prompt, continuation = block
                lines.append(f"- `{_one_line(prompt)}` -> `{_one_line(continuation)}`")
            else:
                lines.append(block)
            lines.append("")
        for figure in figure_names:
            if FIGURE_SECTIONS.get(figure) == name:
                lines += [f"![{figure}]({figure_folder}/{figure})", ""]
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;
font-size:.92em}th{background:#f3f3f3}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
section{margin-bottom:2em}img{max-width:100%}.sample{font-family:monospace;white-space:pre-wrap;background:#f7f7f7;
padding:.5em;margin:.4em 0}.sample b{color:#064}"""


def render_html(data: ReportData, pictures: dict[str, bytes]) -> str:
    """One HTML file with no outside reference: styles inline, figures as PNG data URIs."""
    escape = html.escape
    parts = ["<!doctype html>", "<html lang='en'><head><meta charset='utf-8'>",
             f"<title>raylm report: {escape(data.experiment)}</title><style>{STYLE}</style></head><body>",
             f"<h1>raylm report: {escape(data.experiment)}</h1>",
             f"<p>Workspace <code>{escape(data.workspace)}</code></p>",
             "<nav>" + " &middot; ".join(f"<a href='#{name}'>{TITLES[name]}</a>" for name in SECTIONS) + "</nav>"]
    bodies = section_bodies(data)
    for name in SECTIONS:
        parts.append(f"<section id='{name}'><h2>{TITLES[name]}</h2>")
        for kind, block in bodies[name]:
            if kind == "table":
                header, rows = block
                parts.append("<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in header) + "</tr>")
                parts += ["<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows]
                parts.append("</table>")
            elif kind == "pre":
                parts.append(f"<pre>{escape(block)}</pre>")
            elif kind == "sample":
                prompt, continuation = block
                parts.append(f"<div class='sample'>{escape(prompt)}<b>{escape(continuation)}</b></div>")
            else:
                parts.append(f"<p>{escape(block)}</p>")
        for figure, png in pictures.items():
            if FIGURE_SECTIONS.get(figure) == name:
                encoded = base64.b64encode(png).decode("ascii")
                parts.append(f"<img alt='{escape(figure)}' src='data:image/png;base64,{encoded}'>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# Small formatting helpers


def _how_to_run(section: str) -> str:
    return {"tuning": "set tune in the config and run `raylm pipeline`, or run `raylm tune`",
            "finetuning": "set finetune.data", "scores": "add benchmark tasks to eval.tasks",
            "samples": "no finished checkpoint"}.get(section, "run `raylm pipeline`")


def _count(value: Any) -> str:
    return f"{int(value):,}" if isinstance(value, (int, float)) and value == value else ""


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and value == value else ""


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and value == value else ""


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _one_line(text: str, limit: int = 160) -> str:
    flat = text.replace("\n", "\\n").replace("`", "'")
    return flat if len(flat) <= limit else flat[:limit] + "..."

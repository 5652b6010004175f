"""The recipe in order: plan -> curate -> tokenize -> (tune) -> pretrain -> eval -> (finetune) -> (benchmarks)
-> report; the steps in parentheses run when the config asks for them (the `pipeline` section, `finetune.data`,
`eval.tasks`).

Stage folders are planned from the config alone (`raylm/stage_plan.py`: each is named by a hash of its
section and its upstream's fingerprint), so any single stage can find the outputs it builds on without rerunning
them, and `pipeline` reuses every stage that already finished. A pipeline is one MLflow parent run
holding one nested run per stage.
"""

from __future__ import annotations

import logging

from raylm import lineage, tracking
from raylm.artifacts import Artifact, Curated, Evaluated, Finetuned, Packed, Pretrained
from raylm.config import ConfigError, DataConfig, RaylmConfig, SourceConfig, TokenizerConfig, section_data
from raylm.registry import log_checkpoint_model, record_scores
from raylm.stage import execute
from raylm.stage_plan import file_fingerprint, plan_stages, source_fingerprint
from raylm.tracking import Tracker, flatten, ui_command
from raylm.workspace import StageDir, Workspace, content_hash

log = logging.getLogger("raylm")

STAGES = ("curate", "tokenize", "pretrain", "eval")
ARTIFACTS: dict[str, type] = {"curate": Curated, "tokenize": Packed, "pretrain": Pretrained, "eval": Evaluated}


def finetune_data_line(figures: dict[str, float]) -> str:
    """The fine-tuning data's figures in one line (rows per layout, turns, tokens, dropped rows and why)."""
    layouts = {key.removeprefix("data_rows_layout_"): int(value) for key, value in figures.items()
               if key.startswith("data_rows_layout_")}
    if not layouts:
        return ""
    per_layout = ", ".join(f"{count:,} {layout}" for layout, count in sorted(layouts.items()))
    tokens = int(figures.get("data_train_tokens", 0) + figures.get("data_val_tokens", 0))
    return (f"rows {int(figures.get('data_rows_input', 0)):,} ({per_layout}), turns {int(figures.get('data_turns', 0)):,}, "
            f"tokens {tokens:,} packed (targets {int(figures.get('data_train_targets', 0)):,} train), "
            f"dropped {int(figures.get('data_rows_rejected_too_long', 0)):,} (longer than seq_len)")


class StageNotReady(RuntimeError):
    """A stage needs the output of an earlier stage that has not finished for this config."""


# The earlier stages each single-stage command reads (its `require` calls), checked before Ray starts.
NEEDS = {"tokenize": ("curate",), "pretrain": ("tokenize",), "eval": ("pretrain", "tokenize"), "tune": ("tokenize",)}


def check_ready(config: RaylmConfig, command: str) -> None:
    """StageNotReady, before Ray starts, when `raylm <command>` needs a stage that has not finished."""
    plan = plan_stages(config, Workspace(config.workspace.root))
    for name in NEEDS.get(command, ()):
        stage: StageDir = getattr(plan, name)
        if not stage.is_complete():
            raise not_ready(name, stage)


def not_ready(name: str, stage: StageDir) -> StageNotReady:
    return StageNotReady(f"stage {name!r} has not finished for this config (expected {stage.uri}); "
                         f"run `raylm {name}` or `raylm pipeline` first")


class Pipeline:
    """The stages of one experiment config, run one at a time or all in order."""

    def __init__(self, config: RaylmConfig, force: tuple[str, ...] = ()):
        # deferred: pulls in ray, slow to import; only this path needs it
        from raylm.runtime import check_shared_storage, init_ray

        self.config = config
        self.force = set(STAGES) if "all" in force else set(force)
        self.workspace = Workspace(config.workspace.root)
        self.tracker = Tracker(config.tracking, self.workspace)
        # manifests `run_all` fills: the sweep (pipeline.tune), the benchmark run, the report card
        self.sweep: dict | None = None
        self.benchmarks: dict | None = None
        self.report: dict | None = None
        self.plan = plan_stages(config, self.workspace)
        init_ray(config.cluster)
        check_shared_storage(config.cluster, self.workspace.root, self.tracker.uri)

    def require(self, name: str) -> Artifact:
        """The artifact of an earlier stage of this config (e.g. `require("tokenize")`: its `Packed`);
        `StageNotReady` when that stage has not finished."""
        stage: StageDir = getattr(self.plan, name)
        if not stage.is_complete():
            raise not_ready(name, stage)
        return ARTIFACTS[name].from_manifest(stage.manifest())

    def curate(self) -> Curated:
        # deferred: pulls in pandas, ray, slow to import; only this path needs it
        from raylm.data.curate import curate

        def body(stage: StageDir) -> Curated:
            curated = curate(self.config.data, stage)
            lineage.log_sources(self.config.data, source_fingerprint(self.config)[:16], curated)
            return curated

        return execute(self.plan.curate, self.config.section("data"), self.tracker, body, Curated,
                       force="curate" in self.force)

    def tokenize(self) -> Packed:
        # deferred: pulls in pandas, ray, slow to import; only this path needs it
        from raylm.data.tokenize import tokenize

        curated = self.require("curate")

        def body(stage: StageDir) -> Packed:
            lineage.log_curated(curated, self.plan.curate.key)
            return tokenize(self.config.tokenizer, self.config.model.seq_len, curated, stage)

        return execute(self.plan.tokenize, self.config.section("tokenizer"), self.tracker, body, Packed,
                       force="tokenize" in self.force)

    def pretrain(self, init_checkpoint: str | None = None, resume: bool = False) -> Pretrained:
        """Train in this config's stage folder (continuing it if interrupted); `resume`: continue the
        most recently written pretrain folder instead (e.g. with a larger train.max_steps)."""
        # deferred: pulls in ray, torch, slow to import; only this path needs it
        from raylm.train.launch import latest_run_stage, pretrain

        packed = self.require("tokenize")
        section = {"model": self.config.section("model"), "train": self.config.section("train")}
        stage = self.plan.pretrain
        if resume:
            stage = latest_run_stage(self.workspace, stage)
            log.info("pretrain: resuming %s", stage.uri)
        def body(stage: StageDir) -> Pretrained:
            lineage.log_packed(packed, self.plan.tokenize.key)
            trained = pretrain(self.config.model, self.config.train, packed, stage, self.tracker.uri, init_checkpoint)
            log_checkpoint_model(trained.checkpoint, self.config.tracking, "pretrain")
            return trained

        return execute(stage, section, self.tracker, body, Pretrained,
                       force="pretrain" in self.force and not resume, resumable=True)

    def eval(self) -> Evaluated:
        # deferred: pulls in ray, torch, slow to import; only this path needs it
        from raylm.eval.bpb import evaluate_stage

        trained, packed = self.require("pretrain"), self.require("tokenize")

        def body(stage: StageDir) -> Evaluated:
            evaluated = evaluate_stage(trained, packed, self.config.eval.batch_size, self.config.eval.limit)
            record_scores(self.tracker.client, trained.record.mlflow_run_id, evaluated.metrics, "val_bpb",
                          lineage.packed_dataset(packed, self.plan.tokenize.key))
            return evaluated

        return execute(self.plan.eval, self.config.section("eval"), self.tracker, body, Evaluated,
                       force="eval" in self.force)

    def finetune(self, base_source: str) -> Finetuned:
        """Fine-tune the base named by `--from` on `finetune.data` (see raylm/finetune/stage.py)."""
        # deferred: pulls in torch, slow to import; only this path needs it
        from raylm.finetune.stage import check_architecture, finetune, finetune_train_config, resolve_base

        settings = self.config.finetune
        if settings.data is None:
            raise ConfigError(["finetune.data = None: set the fine-tuning data (plain text or chat jsonl)"])
        base = resolve_base(base_source, self.workspace, self.tracker.uri)
        model = check_architecture(self.config.model, base)
        train = finetune_train_config(self.config.train, settings)
        packed_stage, packed = self._finetune_data(base, model.seq_len)
        section = {"finetune": self.config.section("finetune"), "train": section_data(train),
                   "model": model.section()}
        stage = self.workspace.stage("finetune", section, {"base": base.fingerprint, "data": packed_stage.fingerprint})
        def body(st: StageDir) -> Finetuned:
            lineage.log_packed(packed, packed_stage.key, name=packed_stage.name)
            tuned = finetune(model, train, settings, base, packed, st, self.tracker.uri)
            log_checkpoint_model(tuned.checkpoint, self.config.tracking, "finetune")
            return tuned

        return execute(stage, section, self.tracker, body, Finetuned, force="finetune" in self.force, resumable=True)

    def _finetune_data(self, base, seq_len: int) -> tuple[StageDir, Packed]:
        """Chat or instruction records -> `sft-data`; plain text -> `finetune-curate` and `finetune-tokenize`
        with the base's tokenizer. Which one is `finetune.format` (`auto`: `choose_format` on the first rows)."""
        # deferred: pulls in pandas, slow to import; only this path needs it
        from raylm.data.chat_layouts import choose_format

        settings = self.config.finetune
        chosen = choose_format(settings.data, settings.format, settings.columns)
        if settings.format in ("auto", "chat"):
            log.info("finetune.format = %s: the first rows of %s read as %s%s", settings.format, settings.data, chosen,
                     "" if chosen == "text" else " (each row by the layout its keys match)")
        if chosen != "text":
            # deferred: pulls in pandas, ray, slow to import; only this path needs it
            from raylm.data.sft import sft_data

            layout = settings.format if settings.format not in ("auto", "chat") else None
            section = {"data": settings.data, "val_fraction": settings.val_fraction, "seed": settings.seed,
                       "system_prompt": settings.system_prompt, "seq_len": seq_len}
            if layout or settings.columns:  # left out at their defaults: earlier sft-data stages stay reused
                section.update(format=settings.format, columns=settings.columns)
            inputs = {"file": settings.data if settings.data.startswith("hf://") else file_fingerprint(settings.data),
                      "tokenizer": content_hash(base.tokenizer_json)}
            stage = self.workspace.stage("sft-data", section, inputs)
            packed = execute(stage, section, self.tracker,
                             lambda st: sft_data(settings.data, base.tokenizer_json, seq_len, settings.val_fraction,
                                                 settings.seed, settings.system_prompt, st, layout, settings.columns),
                             Packed, force="finetune" in self.force)
            return stage, packed
        # deferred: pulls in pandas, ray, slow to import; only this path needs it
        from raylm.data.curate import curate
        from raylm.data.tokenize import tokenize

        # the experiment's curation settings (cleaning, quality, dedup, ...) on the fine-tuning source
        source = SourceConfig(path=settings.data, text_field=settings.columns.get("text", "text"))
        data = DataConfig.model_validate({**self.config.data.model_dump(), "sources": [source],
                                          "val_fraction": settings.val_fraction, "seed": settings.seed})
        data_config = self.config.model_copy(update={"data": data})
        curate_stage = self.workspace.stage("finetune-curate", {"data": data.model_dump(mode="json"),
                                                                "files": source_fingerprint(data_config)})
        curated = execute(curate_stage, data.model_dump(mode="json"), self.tracker,
                          lambda st: curate(data, st), Curated, force="finetune" in self.force)
        tokenizer = TokenizerConfig(path=base.tokenizer_path)
        section = {"tokenizer": tokenizer.model_dump(mode="json"), "seq_len": seq_len}
        stage = self.workspace.stage("finetune-tokenize", section,
                                     {"curated": curate_stage.fingerprint, "tokenizer": content_hash(base.tokenizer_json)})
        packed = execute(stage, section, self.tracker,
                         lambda st: tokenize(tokenizer, seq_len, curated, st), Packed, force="finetune" in self.force)
        return stage, packed

    def run_all(self) -> dict[str, Artifact]:
        """The whole recipe: plan, curate, tokenize, tune (`pipeline.tune`), pretrain, eval, finetune (when
        `finetune.data` is set), the benchmark tasks of `eval.tasks` on the final model, report. Each step
        that finished before is reused; the optional ones follow the `pipeline` section."""
        steps = self.config.pipeline
        artifacts: dict[str, Artifact] = {}
        params = flatten(self.config.model_dump(mode="json"))
        with self.tracker.run("pipeline", params=params, tags={"raylm.stage": "pipeline",
                                                               "raylm.workspace": self.workspace.root}):
            if steps.plan:
                self.log_plan()
            artifacts["curate"] = self.curate()
            artifacts["tokenize"] = self.tokenize()
            if steps.tune:
                self.tune_first()
            artifacts["pretrain"] = self.pretrain()
            artifacts["eval"] = self.eval()
            final = artifacts["pretrain"].checkpoint
            if steps.finetune and self.config.finetune.data is not None:
                artifacts["finetune"] = self.finetune(final)
                final = artifacts["finetune"].checkpoint
            if steps.benchmarks and set(self.config.eval.tasks) - {"bpb"}:
                self.benchmarks = self.run_benchmarks(final)
            if steps.report:
                self.report = self.write_report()
        return artifacts

    def log_plan(self) -> None:
        """`raylm plan`'s table on the console and as the pipeline run's `plan.txt`."""
        # deferred: plan pulls in the sizing helpers; only this path needs it
        from raylm.plan import format_table, make_plan

        table = format_table(make_plan(self.config))
        print(f"plan (raylm plan):\n{table}", flush=True)
        tracking.log_text(table + "\n", "plan.txt")

    def tune_first(self) -> None:
        """The `tune` sweep on this config's packed data; its best values become this pipeline's config (so
        pretrain, eval and report plan their folders from the tuned config)."""
        # deferred: pulls in ray, slow to import; only this path needs it
        from raylm.tune import run_sweep, trial_config

        manifest = run_sweep(self.config, self.workspace, self.tracker, self.require("tokenize"),
                             self.plan.tokenize.fingerprint, force="tune" in self.force)
        self.sweep = manifest
        best = manifest["best"]["params"]
        log.info("tune: pretraining with the sweep's best values %s", best)
        self.config = trial_config(self.config, best)
        self.plan = plan_stages(self.config, self.workspace)

    def run_benchmarks(self, checkpoint: str) -> dict:
        """`raylm eval --checkpoint <final>`: the tasks of eval.tasks on the final model (its manifest)."""
        # deferred: pulls in ray, torch and lm-eval, slow to import; only this path needs it
        from raylm.eval.command import run_eval_command

        manifest = run_eval_command(self.config, checkpoint, {}, force="eval" in self.force)
        log.info("eval: benchmarks of %s in %s", checkpoint, manifest["uri"])
        return manifest

    def write_report(self) -> dict:
        """The report card of this config's finished stages (raylm/report_stage.py): its manifest."""
        # deferred: pulls in matplotlib and torch, slow to import; only this path needs it
        from raylm.report_stage import write_report

        return write_report(self.config, self.tracker)

    def _model_line(self, name: str, artifact: Artifact) -> list[str]:
        """Where the stage's registered model is (`models:/NAME/VERSION`), when it registered one."""
        run_id = artifact.record.mlflow_run_id
        model_uri = self.tracker.client.get_run(run_id).data.tags.get("raylm.model_uri") if run_id else None
        return [f"  {name} model {model_uri} (mlflow.pyfunc.load_model, mlflow models serve -m ...)"] if model_uri else []

    def summary(self, artifacts: dict[str, Artifact], other_stages: dict[str, str] | None = None,
                command: str = "pipeline") -> str:
        """What `raylm <command>` finished, as a table (stage, wall time, key figures, folder), then the
        checkpoint, the benchmark scores and where to look; `other_stages`: name -> folder of stages without
        an artifact (tune)."""
        rows = [(name, _wall_time(artifact.metrics), key_figures(name, artifact), artifact.record.uri)
                for name, artifact in artifacts.items()]
        rows += [(name, "", "", uri) for name, uri in (other_stages or {}).items()]
        if self.sweep:
            best = self.sweep["best"]
            rows.insert(2, ("tune", _wall_time(self.sweep.get("metrics", {})),
                            f"best {best['params']} ({best['metric']} {best['value']:.4f}), "
                            f"{int(self.sweep['metrics'].get('trials', 0))} trials", self.sweep["uri"]))
        if self.benchmarks:
            rows.append(("benchmarks", "", f"{len(self.benchmarks.get('tasks') or [])} tasks", self.benchmarks["uri"]))
        if self.report:
            rows.append(("report", "", "report.md, report.html", self.report["outputs"]["html"]))
        widths = [max(len(row[i]) for row in rows) if rows else 0 for i in range(3)]
        lines = ["", f"raylm {command} finished:"]
        lines += [f"  {name:<{widths[0]}}  {time:>{widths[1]}}  {figures:<{widths[2]}}  {folder}".rstrip()
                  for name, time, figures, folder in rows]
        final = artifacts.get("finetune") or artifacts.get("pretrain")
        if final:
            lines.append(f"  checkpoint {final.checkpoint}")
        for name in ("pretrain", "finetune"):
            if name in artifacts:
                lines.extend(self._model_line(name, artifacts[name]))
        tuned = artifacts.get("finetune")
        if tuned:
            data_line = finetune_data_line(tuned.metrics)
            if data_line:
                lines.append(f"  data {data_line}")
        if self.benchmarks:
            lines += ["    " + line for line in self.benchmarks["table"].splitlines()]
        lines.append(f"  MLflow: {ui_command(self.tracker.uri, self.tracker.experiment_id)}")
        return "\n".join(lines)


def _wall_time(metrics: dict[str, float]) -> str:
    seconds = metrics.get("stage_seconds")
    return f"{seconds:.0f} s" if isinstance(seconds, (int, float)) else ""


def key_figures(name: str, artifact: Artifact) -> str:
    """The one-line outcome of a stage for the summary table."""
    figures = artifact.metrics
    if isinstance(artifact, Curated):
        return (f"{artifact.rows('input'):,} rows -> {artifact.rows('kept'):,} kept "
                f"({artifact.rows('train'):,} train, {artifact.rows('val'):,} val), {artifact.rows('rejected'):,} rejected")
    if isinstance(artifact, Packed):
        return (f"vocab {artifact.tokenizer.vocab_size:,}, {figures.get('val_bytes_per_token', float('nan')):.2f} "
                f"bytes/token, {int(figures.get('train_tokens', 0)):,} train tokens")
    if isinstance(artifact, Finetuned):
        return (f"{artifact.method}: val loss {figures.get('val_loss_before', float('nan')):.4f} -> "
                f"{figures.get('val_loss_after', float('nan')):.4f}, {int(figures.get('params_trainable', 0)):,} of "
                f"{int(figures.get('params_total', 0)):,} parameters trained")
    if isinstance(artifact, Pretrained):
        initial = figures.get("val_loss_initial")  # measured only with train.eval_at_start
        start = f"{initial:.4f} -> " if isinstance(initial, (int, float)) and initial == initial else ""
        return (f"{int(figures.get('step', 0)):,} steps, val loss {start}{figures.get('val_loss', float('nan')):.4f}, "
                f"{figures.get('tokens_per_s', 0):,.0f} tokens/s")
    if isinstance(artifact, Evaluated):
        return f"val loss {figures['val_loss']:.4f}, val bits-per-byte {figures['val_bpb']:.4f}"
    return ""

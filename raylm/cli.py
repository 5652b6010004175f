"""The `raylm` command: one subcommand per stage, plus `pipeline`.

    raylm pipeline --config configs/laptop.yaml [--set train.lr=1e-3 ...] [--workspace DIR] [--force STAGE]
    raylm curate|tokenize|pretrain|eval --config FILE ...
    raylm generate --checkpoint PATH --prompt TEXT [--temperature 0.8 --top-k 50 --top-p 0.95 --stop TEXT]
    raylm export --checkpoint PATH --out DIR        (a `transformers` model folder)
    raylm finetune --from CHECKPOINT_OR_RUN --config FILE

A checkpoint may also be named as a registered MLflow model, `models:/NAME/VERSION` or
`models:/NAME@ALIAS` (`generate` and `export` look it up in the store of `--config`/`--workspace`).
    raylm plan [--config FILE] [--preset 1b] [--gpu H100 --gpus 8 --hours 24] [--json] [--write FILE] [--log]

Every command validates the whole config before it starts Ray or touches the workspace, and exits
with status 2 and the list of problems when it is invalid.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from raylm import failure
from raylm.console import quiet_progress_bars
from raylm.config import ConfigError, load_config

log = logging.getLogger("raylm")

STAGE_HELP = {
    "curate": "read, clean, deduplicate and split the corpus (Ray Data)",
    "tokenize": "train a BPE tokenizer on the train split and pack both splits",
    "pretrain": "pretrain the transformer (Ray Train)",
    "eval": "held-out bits-per-byte and the benchmark suite (lm-eval on evaluation actors)",
    "finetune": "fine-tune a checkpoint (full, frozen layers or LoRA) on text or chat data",
    "pipeline": "run every stage in order, reusing finished ones",
    "tune": "search hyperparameters with Ray Tune: each trial a Ray Train run, ASHA, nested MLflow runs",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error in one line naming the flag (and where the help is), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_flags(parser: argparse.ArgumentParser, set_help: str,
                  workspace_help: str = "workspace root (default: RAYLM_WORKSPACE or workspace.root)") -> None:
    """--config, --set and --workspace: how every command that reads an experiment finds it."""
    parser.add_argument("--config", "-c", help="experiment YAML (default: configs/laptop.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    parser.add_argument("--workspace", "-w", help=workspace_help)


def _common(parser: argparse.ArgumentParser) -> None:
    _config_flags(parser, "override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", nargs="?", const="__self__",
                        help="rerun a finished stage (`--force` alone: this command's stage; `--force all`)")
    parser.add_argument("--verbose", "-v", action="store_true")


def _eval_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--checkpoint", help="checkpoint path/URI, the MLflow run id that made it, or a registered "
                                          "model models:/NAME/VERSION or models:/NAME@ALIAS "
                                          "(default: this config's pretrain stage, val bits-per-byte only)")
    sub.add_argument("--tasks", help="comma-separated: bpb, arc_easy, arc_challenge, hellaswag, mmlu, truthfulqa_mc1, "
                                     "truthfulqa_mc2, gsm8k, humaneval, mt_bench, domain, groups arc|truthfulqa|standard")
    sub.add_argument("--limit", type=int, help="evaluate the first N items of each task (per task: mmlu's 57 "
                                                 "subjects give 57 x N items)")
    sub.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    sub.add_argument("--benchmark-data", help="local benchmark folder (the layout of shared/data/benchmarks)")
    sub.add_argument("--actors", type=int, help="evaluation actors")
    sub.add_argument("--contamination-index", help="decontamination index: report scores on clean items too")
    sub.add_argument("--allow-code-execution", action="store_true", default=None,
                     help="let HumanEval run model-written code in the sandbox")
    sub.add_argument("--sandbox-allow-weak", action="store_true", default=None,
                     help="where the sandbox's OS fence (namespaces) is unavailable, run HumanEval with rlimits and "
                          "Python guards only instead of refusing")
    sub.add_argument("--judge-url", help="OpenAI-compatible URL of an MT-Bench judge")
    sub.add_argument("--text-file", dest="text_files", action="append", help="also report bits-per-byte of this file")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="raylm", description="Build a language model from scratch on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        sub = commands.add_parser(name, help=text, description=text)
        _common(sub)
        if name in ("tokenize", "pipeline"):
            sub.add_argument("--tokenizer", metavar="PATH",
                             help="reuse this tokenizer (tokenizer.json, its folder, or runs:/RUN_ID/tokenizer) "
                                  "instead of training one; same as --set tokenizer.path=PATH")
        if name == "pretrain":
            sub.add_argument("--from", dest="init_checkpoint",
                             help="start from this checkpoint's weights (a path, URI or models:/NAME/VERSION|@ALIAS)")
            sub.add_argument("--resume", action="store_true",
                             help="continue the latest pretrain run from its newest good checkpoint")
            sub.add_argument("--from-sweep", metavar="RUN_OR_PATH",
                             help="train with a sweep's best values (its MLflow run id, stage folder or best_params.json)")
        if name == "finetune":
            sub.add_argument("--from", dest="base", required=True, metavar="CHECKPOINT_OR_RUN",
                             help="base model: a checkpoint or stage folder, an MLflow run id, a registered model "
                                  "(models:/NAME/VERSION, models:/NAME@ALIAS) or a Hugging Face folder")
        if name == "eval":
            _eval_flags(sub)
    _model_commands(commands)
    _plan_command(commands)
    _report_command(commands)
    return parser


def _report_command(commands) -> None:
    text = "write the report card (report.md, report.html) of this config's finished stages (no Ray)"
    report = commands.add_parser("report", help=text, description=text)
    _config_flags(report, "override a config value (repeatable): the same as the pipeline was run with")
    report.add_argument("--samples", type=int, default=3, help="greedy samples from the final model (0: none)")
    report.add_argument("--verbose", "-v", action="store_true")


def _report(args: argparse.Namespace) -> int:
    from raylm.report_stage import finished_manifests, report_paths, write_report
    from raylm.tracking import Tracker
    from raylm.workspace import Workspace

    config = load_config(args.config, args.overrides, args.workspace)
    finished_manifests(config)  # nothing finished: one line, before the MLflow store is opened
    manifest = write_report(config, Tracker(config.tracking, Workspace(config.workspace.root)), args.samples)
    markdown, page = report_paths(manifest)
    print(f"raylm report: {page}\n              {markdown}")
    return 0


def _plan_command(commands) -> None:
    text = "estimate parameters, tokens, memory, cluster and time before training (no Ray, no GPU)"
    plan = commands.add_parser("plan", help=text, description=text)
    _config_flags(plan, "override a config value, e.g. --set plan.mfu=0.35 (repeatable)",
                  "workspace (for the trained tokenizer's bytes per token, MLflow)")
    plan.add_argument("--preset", help="size this preset instead of the config's model section")
    plan.add_argument("--gpu", help="GPU type (plan.gpu), e.g. H100, A100, L4")
    plan.add_argument("--gpus", type=int, help="number of GPUs (plan.gpus)")
    plan.add_argument("--hours", type=float, help="budget in hours (plan.hours)")
    plan.add_argument("--mfu", type=float, help="assumed MFU (plan.mfu)")
    plan.add_argument("--choose-model", action="store_true",
                      help="pick the largest preset the budget trains compute-optimally")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    plan.add_argument("--write", metavar="FILE", help="write the config with the recommended settings to FILE")
    plan.add_argument("--log", action="store_true", help="log the plan to MLflow (params, metrics, table)")
    plan.add_argument("--verbose", "-v", action="store_true")


def _plan(args: argparse.Namespace) -> int:
    from raylm.config import dump_config
    from raylm.plan import format_table, log_plan, make_plan, recommended_config

    overrides = list(args.overrides)
    if args.preset:
        overrides.append(f"model={{preset: {args.preset}}}")
    for flag, key in (("gpu", "gpu"), ("gpus", "gpus"), ("hours", "hours"), ("mfu", "mfu")):
        if getattr(args, flag) is not None:
            overrides.append(f"plan.{key}={getattr(args, flag)}")
    if args.choose_model:
        overrides.append("plan.choose_model=true")
    config = load_config(args.config, overrides, args.workspace)
    plan = make_plan(config)
    table = format_table(plan)
    print(plan.to_json() if args.json else table)
    if args.write:
        with open(args.write, "w") as handle:
            handle.write(f"# written by raylm plan from {args.config or 'the default config'}\n")
            handle.write(dump_config(recommended_config(config, plan)))
        print(f"raylm plan: wrote {args.write}", file=sys.stderr)
    if args.log:
        run_id = log_plan(config, plan, table)
        print(f"raylm plan: logged to MLflow run {run_id}", file=sys.stderr)
    return 0 if plan.feasible else 1


def _model_commands(commands) -> None:
    generate = commands.add_parser("generate", help="continue a prompt with a trained checkpoint",
                                   description="Continue prompts with a checkpoint (or an exported model folder).")
    generate.add_argument("--checkpoint", required=True, help="checkpoint directory or URI, a transformers folder, or "
                                                              "a registered model (models:/NAME/VERSION, models:/NAME@ALIAS)")
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--stop", action="append", default=[], type=decode_escapes,
                          help='stop at this text (repeatable); escapes are decoded: --stop "\\n\\n" stops at a blank line')
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--no-cache", action="store_true", help="recompute every step instead of using the KV cache")
    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face transformers model folder",
                                 description="Export a decoder checkpoint as a transformers folder (Llama, Qwen2 or GPT-2).")
    export.add_argument("--checkpoint", required=True, help="checkpoint directory or URI, or a registered model "
                                                            "(models:/NAME/VERSION, models:/NAME@ALIAS)")
    for sub in (generate, export):
        sub.add_argument("--config", "-c", help="experiment YAML whose MLflow store holds a models:/ model "
                                                "(default: configs/laptop.yaml; MLFLOW_TRACKING_URI wins)")
        sub.add_argument("--workspace", "-w", help="workspace whose MLflow store holds a models:/ model")
    export.add_argument("--out", required=True, help="output folder")


def decode_escapes(text: str) -> str:
    """Python's backslash escapes in a command-line argument (`\\n`, `\\t`, `\\u00e9`) decoded; other
    characters, non-ASCII included, kept as they are."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def checkpoint_of(reference: str, config_file: str | None = None, workspace: str | None = None, config=None) -> str:
    """The checkpoint a `models:/NAME/VERSION` or `models:/NAME@ALIAS` reference names, looked up in the
    config's MLflow store (before Ray starts); any other reference unchanged."""
    from raylm.registry import checkpoint_for, is_model_uri

    if not is_model_uri(reference):
        return reference
    from raylm.tracking import resolve_tracking_uri
    from raylm.workspace import Workspace

    config = config or load_config(config_file, [], workspace)
    checkpoint, _ = checkpoint_for(reference, resolve_tracking_uri(config.tracking, Workspace(config.workspace.root)))
    log.info("%s is checkpoint %s", reference, checkpoint)
    return checkpoint


def _load_for_generation(path: str):
    """(model, tokenizer JSON) from a raylm checkpoint or an exported transformers folder."""
    import os

    from raylm.train.checkpoint import load_model, load_tokenizer_json, local_checkpoint

    if os.path.exists(os.path.join(path, "config.json")) and not os.path.exists(os.path.join(path, "model_config.json")):
        from raylm.model.hf import import_hf

        model, _ = import_hf(path)
        return model, load_tokenizer_json(path)
    with local_checkpoint(path) as directory:
        return load_model(directory), load_tokenizer_json(directory)


def _generate(args: argparse.Namespace) -> int:
    import torch

    from raylm.data.tokenizer import tokenizer_from_json
    from raylm.model.generate import generate_text

    model, tokenizer_json = _load_for_generation(checkpoint_of(args.checkpoint, args.config, args.workspace))
    if tokenizer_json is None:
        print(f"raylm: {args.checkpoint} has no tokenizer.json", file=sys.stderr)
        return 2
    texts = generate_text(model, tokenizer_from_json(tokenizer_json), args.prompt, args.max_new_tokens,
                          stop=args.stop, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          use_cache=not args.no_cache, generator=torch.Generator().manual_seed(args.seed))
    for prompt, text in zip(args.prompt, texts):
        print(prompt + text)
    return 0


def _export(args: argparse.Namespace) -> int:
    from raylm.model.hf import ExportError, export_hf
    from raylm.train.checkpoint import load_model, load_model_config, load_tokenizer_json, local_checkpoint

    with local_checkpoint(checkpoint_of(args.checkpoint, args.config, args.workspace)) as directory:
        config = load_model_config(directory)
        model, tokenizer_json = load_model(directory), load_tokenizer_json(directory)
    try:
        export_hf(model, config, tokenizer_json, args.out)
    except ExportError as error:
        print(f"raylm: cannot export {args.checkpoint}: {error}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {args.out}")
    return 0


def _run_eval(config, args: argparse.Namespace) -> int:
    from raylm.eval.command import run_eval_command

    overrides = {"tasks": args.tasks.split(",") if args.tasks else None, "limit": args.limit,
                 "num_fewshot": args.num_fewshot, "benchmark_data": args.benchmark_data, "actors": args.actors,
                 "contamination_index": args.contamination_index, "allow_code_execution": args.allow_code_execution,
                 "sandbox_allow_weak": args.sandbox_allow_weak,
                 "judge_url": args.judge_url, "text_files": args.text_files}
    manifest = run_eval_command(config, args.checkpoint, overrides)
    print(manifest["table"])
    print(f"results: {manifest['uri']}  MLflow run: {manifest['mlflow_run_id']}")
    return 0


def _run_stage(name: str, args: argparse.Namespace) -> int:
    from raylm.pipeline import Pipeline, check_ready

    overrides = list(args.overrides)
    if getattr(args, "tokenizer", None):
        overrides.append(f"tokenizer.path={args.tokenizer}")
    config = load_config(args.config, overrides, args.workspace)
    if name == "eval" and args.checkpoint:
        check_storage(config, sources=False)
        failure.open_run_log(config.workspace.root, name, verbose=getattr(args, "verbose", False))
        return _run_eval(config, args)
    if name == "pretrain" and args.from_sweep:
        config = _config_from_sweep(args, config, overrides)
    if name == "tune":
        from raylm.tune import check_sweep

        check_sweep(config)
    if name == "pretrain" and args.init_checkpoint:  # a bad --from is refused before Ray starts
        from raylm.train.launch import check_init_checkpoint

        args.init_checkpoint = checkpoint_of(args.init_checkpoint, config=config)
        check_init_checkpoint(config.model, args.init_checkpoint)
    if name == "finetune":  # bad data or a bad --from is refused before Ray starts or the workspace is touched
        from raylm.data.chat_layouts import choose_format
        from raylm.finetune.stage import check_base_source

        settings = config.finetune
        if settings.data is not None:
            choose_format(settings.data, settings.format, settings.columns)
        args.base = checkpoint_of(args.base, config=config)
        check_base_source(args.base, config.model)
        if settings.data is None:
            raise ConfigError(["finetune.data = None: set the fine-tuning data (plain text or chat jsonl)"])
    check_storage(config, sources=name in ("curate", "pipeline"))  # after the checks that touch no storage
    failure.open_run_log(config.workspace.root, name, verbose=getattr(args, "verbose", False))
    if not (name == "pretrain" and args.resume):  # --resume reads the newest run, whatever its config
        check_ready(config, name)
    force = tuple(name if f == "__self__" else f for f in args.force)
    pipeline = Pipeline(config, force=force)
    if name == "tune":
        from raylm.tune import run_sweep, summary_lines

        manifest = run_sweep(config, pipeline.workspace, pipeline.tracker, pipeline.require("tokenize"),
                             pipeline.plan.tokenize.fingerprint, force="tune" in pipeline.force)
        print("\n".join([pipeline.summary({}, {name: manifest["uri"]}, command=name), *summary_lines(manifest)]))
        return 0
    if name == "pipeline":
        artifacts = pipeline.run_all()
    elif name == "pretrain":
        artifacts = {name: pipeline.pretrain(args.init_checkpoint, args.resume)}
    elif name == "finetune":
        artifacts = {name: pipeline.finetune(args.base)}
    else:
        artifacts = {name: getattr(pipeline, name)()}
    print(pipeline.summary(artifacts, command=name))
    return 0


def check_storage(config, sources: bool) -> None:
    """Before Ray starts: the workspace takes a test object, and (`sources`) every remote source lists files.

    Raises ConfigError with one line per problem, naming the key and the URI.
    """
    from raylm.storage import is_http, is_object_store, probe_workspace, remote_source_problem

    problems = []
    if sources:
        for index, source in enumerate(config.data.sources):
            if is_object_store(source.path) or is_http(source.path):
                problem, count = remote_source_problem(f"data.sources[{index}].path", source.path)
                if problem:
                    problems.append(problem)
                else:
                    log.info("data.sources[%d]: %s matches %d file(s)", index, source.path, count)
    problem = probe_workspace(config.workspace.root)
    if problem:
        problems.append(problem)
    if problems:
        raise ConfigError(problems)


def _config_from_sweep(args: argparse.Namespace, config, overrides: list[str] | None = None):
    """The config with a sweep's best values applied; explicit `--set`s still win."""
    from raylm.tracking import resolve_tracking_uri
    from raylm.tune import from_sweep_overrides
    from raylm.workspace import Workspace

    uri = resolve_tracking_uri(config.tracking, Workspace(config.workspace.root))
    best = from_sweep_overrides(args.from_sweep, uri)
    log.info("pretrain: with the sweep's best values %s", best)
    return load_config(args.config, [*best, *(args.overrides if overrides is None else overrides)], args.workspace)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not getattr(args, "verbose", False):
        quiet_progress_bars()  # before MLflow, lm-eval and datasets are imported: they read it then
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "export":
            return _export(args)
        if args.command == "plan":
            return _plan(args)
        if args.command == "report":
            return _report(args)
        return _run_stage(args.command, args)
    except ConfigError as error:
        print(f"raylm: {error}", file=sys.stderr)
        return 2
    except ValueError as error:  # bad input: fine-tuning rows, base model, method settings; eval tasks and files
        from raylm.data.benchmarks import BenchmarkFileError
        from raylm.data.chat import ChatDataError
        from raylm.data.chat_layouts import LayoutError
        from raylm.eval.tasks import EvalInputError
        from raylm.finetune import FinetuneError
        from raylm.finetune.stage import BaseModelError
        from raylm.registry import ModelReferenceError

        if not isinstance(error, (ChatDataError, LayoutError, FinetuneError, BaseModelError, EvalInputError,
                                  BenchmarkFileError, ModelReferenceError)):
            return _failed(error, args)
        print(f"raylm: {error}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # a damaged or crafted checkpoint (generate, export); an earlier stage not run
        from raylm.pipeline import StageNotReady
        from raylm.report_stage import NothingToReport
        from raylm.train.checkpoint import CheckpointError
        from raylm.workspace import DamagedManifest

        if not isinstance(error, (CheckpointError, StageNotReady, NothingToReport, DamagedManifest)):
            return _failed(error, args)
        print(f"raylm: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - any other failure: one line, the traceback in the run log
        return _failed(error, args)
    finally:
        failure.close_run_log()


def _failed(error: Exception, args: argparse.Namespace) -> int:
    """Write the traceback to the run log, print the one line naming stage, step, fault and log; with
    --verbose (or before a run log exists) the traceback also goes to the console."""
    path = failure.log_path()
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write("".join(traceback.format_exception(error)))
    if getattr(args, "verbose", False) or not path:
        traceback.print_exception(error)
    print(failure.describe(error, args.command), file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

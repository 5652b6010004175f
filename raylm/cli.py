"""The `raylm` command: one subcommand per stage, plus `pipeline`.

    raylm pipeline --config configs/laptop.yaml [--set train.lr=1e-3 ...] [--workspace DIR] [--force STAGE]
    raylm curate|tokenize|pretrain|eval --config FILE ...

Every command validates the whole config before it starts Ray or touches the workspace, and exits
with status 2 and the list of problems when it is invalid.
"""

from __future__ import annotations

import argparse
import logging
import sys
from raylm.config import ConfigError, load_config

log = logging.getLogger("raylm")

STAGE_HELP = {
    "curate": "read, clean, deduplicate and split the corpus (Ray Data)",
    "tokenize": "train a BPE tokenizer on the train split and pack both splits",
    "pretrain": "pretrain the transformer (Ray Train)",
    "eval": "held-out bits-per-byte and the benchmark suite (lm-eval on evaluation actors)",
    "pipeline": "run every stage in order, reusing finished ones",
}


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="experiment YAML (default: configs/laptop.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--workspace", "-w", help="workspace root (default: RAYLM_WORKSPACE or workspace.root)")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE", nargs="?", const="__self__",
                        help="rerun a finished stage (`--force` alone: this command's stage; `--force all`)")
    parser.add_argument("--verbose", "-v", action="store_true")


def _eval_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--checkpoint", help="checkpoint path/URI or the MLflow run id that made it "
                                          "(default: this config's pretrain stage, val bits-per-byte only)")
    sub.add_argument("--tasks", help="comma-separated: bpb, arc_easy, arc_challenge, hellaswag, mmlu, truthfulqa_mc1, "
                                     "truthfulqa_mc2, gsm8k, humaneval, mt_bench, domain, groups arc|truthfulqa|standard")
    sub.add_argument("--limit", type=int, help="evaluate the first N items of each task")
    sub.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    sub.add_argument("--benchmark-data", help="local benchmark folder (the layout of shared/data/benchmarks)")
    sub.add_argument("--actors", type=int, help="evaluation actors")
    sub.add_argument("--contamination-index", help="decontamination index: report scores on clean items too")
    sub.add_argument("--allow-code-execution", action="store_true", default=None,
                     help="let HumanEval run model-written code in the sandbox")
    sub.add_argument("--judge-url", help="OpenAI-compatible URL of an MT-Bench judge")
    sub.add_argument("--text-file", dest="text_files", action="append", help="also report bits-per-byte of this file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Build a language model from scratch on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        sub = commands.add_parser(name, help=text, description=text)
        _common(sub)
        if name == "pretrain":
            sub.add_argument("--from", dest="init_checkpoint", help="start from this checkpoint's weights")
        if name == "eval":
            _eval_flags(sub)
    return parser


def _run_eval(config, args: argparse.Namespace) -> int:
    from raylm.eval.command import run_eval_command

    overrides = {"tasks": args.tasks.split(",") if args.tasks else None, "limit": args.limit,
                 "num_fewshot": args.num_fewshot, "benchmark_data": args.benchmark_data, "actors": args.actors,
                 "contamination_index": args.contamination_index, "allow_code_execution": args.allow_code_execution,
                 "judge_url": args.judge_url, "text_files": args.text_files}
    manifest = run_eval_command(config, args.checkpoint, overrides)
    print(manifest["table"])
    print(f"results: {manifest['uri']}  MLflow run: {manifest['mlflow_run_id']}")
    return 0


def _run_stage(name: str, args: argparse.Namespace) -> int:
    from raylm.pipeline import Pipeline

    config = load_config(args.config, args.overrides, args.workspace)
    if name == "eval" and args.checkpoint:
        return _run_eval(config, args)
    force = tuple(name if f == "__self__" else f for f in args.force)
    pipeline = Pipeline(config, force=force)
    if name == "pipeline":
        manifests = pipeline.run_all()
    elif name == "pretrain":
        manifests = {name: pipeline.pretrain(args.init_checkpoint)}

    else:
        manifests = {name: getattr(pipeline, name)()}
    print(pipeline.summary(manifests))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return _run_stage(args.command, args)
    except ConfigError as error:
        print(f"raylm: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

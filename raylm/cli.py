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
    "eval": "held-out loss and bits-per-byte of the trained checkpoint",
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raylm", description="Build a language model from scratch on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        sub = commands.add_parser(name, help=text, description=text)
        _common(sub)
        if name in ("tokenize", "pipeline"):
            sub.add_argument("--tokenizer", metavar="PATH",
                             help="reuse this tokenizer (tokenizer.json, its folder, or runs:/RUN_ID/tokenizer) "
                                  "instead of training one; same as --set tokenizer.path=PATH")
        if name == "pretrain":
            sub.add_argument("--from", dest="init_checkpoint", help="start from this checkpoint's weights")
    return parser


def _run_stage(name: str, args: argparse.Namespace) -> int:
    from raylm.pipeline import Pipeline

    overrides = list(args.overrides)
    if getattr(args, "tokenizer", None):
        overrides.append(f"tokenizer.path={args.tokenizer}")
    config = load_config(args.config, overrides, args.workspace)
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

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
    "tune": "search hyperparameters with Ray Tune: each trial a Ray Train run, ASHA, nested MLflow runs",
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
        if name == "pretrain":
            sub.add_argument("--from", dest="init_checkpoint", help="start from this checkpoint's weights")
            sub.add_argument("--resume", action="store_true",
                             help="continue the latest pretrain run from its newest good checkpoint")
            sub.add_argument("--from-sweep", metavar="RUN_OR_PATH",
                             help="train with a sweep's best values (its MLflow run id, stage folder or best_params.json)")
    return parser


def _run_stage(name: str, args: argparse.Namespace) -> int:
    from raylm.pipeline import Pipeline

    config = load_config(args.config, args.overrides, args.workspace)
    if name == "pretrain" and args.from_sweep:
        config = _config_from_sweep(args, config)
    if name == "tune":
        from raylm.tune import check_sweep

        check_sweep(config)
    force = tuple(name if f == "__self__" else f for f in args.force)
    pipeline = Pipeline(config, force=force)
    if name == "tune":
        from raylm.tune import run_sweep, summary_lines

        manifest = run_sweep(config, pipeline.workspace, pipeline.tracker, pipeline._require("tokenize"),
                             pipeline.plan.tokenize.fingerprint, force="tune" in pipeline.force)
        print("\n".join([pipeline.summary({name: manifest}), *summary_lines(manifest)]))
        return 0
    if name == "pipeline":
        manifests = pipeline.run_all()
    elif name == "pretrain":
        manifests = {name: pipeline.pretrain(args.init_checkpoint, args.resume)}
    else:
        manifests = {name: getattr(pipeline, name)()}
    print(pipeline.summary(manifests))
    return 0


def _config_from_sweep(args: argparse.Namespace, config):
    """The config with a sweep's best values applied; explicit `--set`s still win."""
    from raylm.tracking import resolve_tracking_uri
    from raylm.tune import from_sweep_overrides
    from raylm.workspace import Workspace

    uri = resolve_tracking_uri(config.tracking, Workspace(config.workspace.root))
    overrides = from_sweep_overrides(args.from_sweep, uri)
    log.info("pretrain: with the sweep's best values %s", overrides)
    return load_config(args.config, [*overrides, *args.overrides], args.workspace)


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

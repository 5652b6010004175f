"""What every `ray job submit` entrypoint shares: run one `raylm` subcommand in the job's driver.

Each file in jobs/ is `raylm <command>` and nothing else, so a job takes exactly the CLI's flags
(`--config`, `--set`, `--workspace`, `--force`) and runs the same code. Inside a job Ray is already
there (`RAY_ADDRESS` is set by the job supervisor), so the stages attach to the cluster instead of
starting a local instance; the workspace and the MLflow server come from the config or from
`RAYLM_WORKSPACE` / `MLFLOW_TRACKING_URI` (set them in the runtime_env's `env_vars`).

The working directory (`--working-dir .`) is first on `sys.path`, so the job runs the raylm code that
was uploaded with it, not whatever version the cluster image has installed.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: str) -> None:
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    from raylm.cli import main

    sys.exit(main([command, *sys.argv[1:]]))

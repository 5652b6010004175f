"""`ray job submit` entrypoint for `raylm eval`: evaluate the trained checkpoint.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/eval.py --config configs/cluster.yaml

It is `raylm eval` and nothing else: the same flags (`--config`, `--set`, `--workspace`, `--force`; see
`raylm eval --help`, including `--checkpoint RUN_OR_PATH --tasks ... --benchmark-data DIR --actors N` for the
benchmark suite on evaluation actors), the same code. Inside a job Ray is already there (the job supervisor sets
RAY_ADDRESS), so the stages attach to the cluster; the workspace and the MLflow server come from the
config or from RAYLM_WORKSPACE / MLFLOW_TRACKING_URI (jobs/runtime_env.yaml). A bad config exits with
status 2 and the problems in the job's logs before anything runs.
"""

import os
import sys

# The repository (the uploaded working dir) replaces jobs/ at the head of sys.path: the job runs the
# raylm code it was submitted with, not an installed copy.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from raylm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))

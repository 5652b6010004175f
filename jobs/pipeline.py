"""`ray job submit` entrypoint for the whole pipeline.

    ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/laptop.yaml

It takes the same arguments as `raylm pipeline` and runs the same code; inside a job, Ray is already
there (RAY_ADDRESS is set), so the stages attach to the cluster instead of starting a local one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raylm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))

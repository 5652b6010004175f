"""`ray job submit` entrypoint for `raylm pipeline`: every stage in order, reusing finished ones.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pipeline.py --config configs/cluster.yaml

Takes exactly the flags of `raylm pipeline` (see `raylm pipeline --help`); jobs/_entry.py says how it runs.
"""

from _entry import run

if __name__ == "__main__":
    run("pipeline")

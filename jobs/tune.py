"""`ray job submit` entrypoint for `raylm tune`: hyperparameter search with Ray Tune.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tune.py --config configs/cluster.yaml

Takes exactly the flags of `raylm tune` (see `raylm tune --help`); jobs/_entry.py says how it runs.
"""

from _entry import run

if __name__ == "__main__":
    run("tune")

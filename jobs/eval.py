"""`ray job submit` entrypoint for `raylm eval`: evaluate the trained checkpoint.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/eval.py --config configs/cluster.yaml

Takes exactly the flags of `raylm eval` (see `raylm eval --help`); jobs/_entry.py says how it runs.
"""

from _entry import run

if __name__ == "__main__":
    run("eval")

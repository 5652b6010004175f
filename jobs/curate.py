"""`ray job submit` entrypoint for `raylm curate`: read, clean, deduplicate and split the corpus.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/curate.py --config configs/cluster.yaml

Takes exactly the flags of `raylm curate` (see `raylm curate --help`); jobs/_entry.py says how it runs.
"""

from _entry import run

if __name__ == "__main__":
    run("curate")

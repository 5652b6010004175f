"""`ray job submit` entrypoint for `raylm pretrain`: pretrain the transformer with Ray Train.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pretrain.py --config configs/cluster.yaml

Takes exactly the flags of `raylm pretrain` (see `raylm pretrain --help`); jobs/_entry.py says how it runs.
"""

from _entry import run

if __name__ == "__main__":
    run("pretrain")

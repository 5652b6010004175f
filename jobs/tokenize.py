"""`ray job submit` entrypoint for `raylm tokenize`: train the tokenizer and pack the splits.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/tokenize.py --config configs/cluster.yaml

Takes exactly the flags of `raylm tokenize` (see `raylm tokenize --help`); jobs/_entry.py says how it runs.
"""

from _entry import run

if __name__ == "__main__":
    run("tokenize")

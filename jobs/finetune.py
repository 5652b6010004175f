"""`ray job submit` entrypoint for `raylm finetune`: fine-tune a pretrained checkpoint (full, frozen layers or LoRA).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/finetune.py --config configs/cluster.yaml

Takes exactly the flags of `raylm finetune` (see `raylm finetune --help`); jobs/_entry.py says how it runs.
"""

from _entry import run

if __name__ == "__main__":
    run("finetune")

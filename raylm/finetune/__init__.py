"""Fine-tuning, in one place: `methods` (full, frozen layers, LoRA: which weights train, and folding
adapters back; pure PyTorch, what every training worker calls) and `stage` (the `finetune` stage:
resolve the base, run the pretraining trainer from it, export; Ray and MLflow). The package exports
the methods only, so a training worker importing them does not import the stage.
"""

from raylm.finetune.methods import (
                                    BLOCK_LINEARS,
                                    METHODS,
                                    FinetuneError,
                                    is_lora,
                                    merge_lora,
                                    parameter_counts,
                                    prepare_for_finetune,
)

__all__ = ["BLOCK_LINEARS", "METHODS", "FinetuneError", "is_lora", "merge_lora", "parameter_counts",
           "prepare_for_finetune"]

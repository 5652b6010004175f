"""Distributed training on Ray Train: the per-worker loop, parallelism, checkpoints and the launcher."""

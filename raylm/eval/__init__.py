"""Evaluation: held-out bits-per-byte, and the benchmark suite through lm-eval on evaluation actors."""

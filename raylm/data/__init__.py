"""Data stages: sources, cleaning, dedup, tokenizer training and sequence packing."""

"""Named training recipes: a top-level `recipe:` key (or `--set recipe=modern`) fills in `model` and
`train` keys that the config file does not set (keys the file sets win), before validation.

- `gpt2`: the 2019 recipe, the benchmark's baseline: learned positions, LayerNorm, GELU, biases, tied
  embedding and head, AdamW on every parameter, cosine schedule.
- `modern`: what the open small-model efforts (modded-nanogpt's speedrun, nanochat) train with, on top of
  raylm's default RoPE / RMSNorm decoder: Muon on the blocks' matrices (AdamW for the rest), a
  warmup-stable-decay schedule, RMSNorm on queries and keys, untied embedding and head, zero-initialised
  output projections, a ReLU-squared feed-forward and soft-capped logits.
  benchmarks/recipe.py measures it against `gpt2` at equal training FLOPs.

A recipe names no sizes: the model's width, depth and context stay the file's (or its `model.preset`'s).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {
        "model": dict(position="learned", norm="layernorm", activation="gelu", bias=True, tie_embeddings=True),
        "train": dict(optimizer="adamw", schedule="cosine"),
    },
    "modern": {
        "model": dict(position="rope", norm="rmsnorm", activation="relu2", qk_norm=True, tie_embeddings=False,
                      zero_init_projections=True, logit_softcap=15.0),
        "train": dict(optimizer="muon", muon_lr=0.02, muon_momentum=0.95, schedule="wsd", decay_fraction=0.4),
    },
}


def with_recipe(tree: dict[str, Any]) -> dict[str, Any]:
    """The config tree with its `recipe`'s keys filled in under the keys it sets itself."""
    name = tree.get("recipe")
    if name is None:
        return tree
    if name not in RECIPES:
        raise ValueError(f"recipe = {name!r}: expected one of {', '.join(RECIPES)}")
    out = dict(tree)
    for section, keys in RECIPES[name].items():
        given = out.get(section) or {}
        if not isinstance(given, dict):
            return tree  # the section's own validation names the problem
        out[section] = {**keys, **given}
    return out

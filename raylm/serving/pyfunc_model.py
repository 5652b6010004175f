"""A raylm language model as an MLflow pyfunc, logged as a model from code.

MLflow loads this file itself (`mlflow.pyfunc.log_model(python_model=<this file>)`), so a loaded
model is built from the code here and three plain files: `model.safetensors` (the weights),
`model_config.json` and `tokenizer.json`. Nothing is unpickled, the same rule as for checkpoints.

`predict` takes prompts (a list of strings, or a DataFrame whose `prompt` column, or first column,
holds them) and returns their continuations, one string per prompt; `max_new_tokens`, `temperature`,
`top_k`, `top_p` and `seed` come as params (the signature's defaults: 64 tokens, greedy).
"""

from __future__ import annotations

import json

import mlflow.pyfunc

from raylm.serving import MODEL_CONFIG, PARAM_DEFAULTS, TOKENIZER, WEIGHTS, prompts_of


class RaylmLanguageModel(mlflow.pyfunc.PythonModel):
    """Continuations of text prompts by a raylm checkpoint exported as safetensors."""

    def load_context(self, context) -> None:
        # deferred: torch and the model family are needed only once a model is loaded
        from safetensors.torch import load_model

        from raylm.data.tokenizer import tokenizer_from_json
        from raylm.model import build_model

        with open(context.artifacts[MODEL_CONFIG], encoding="utf-8") as handle:
            self.model = build_model(json.load(handle))
        load_model(self.model, context.artifacts[WEIGHTS], strict=True)
        self.model.eval()
        with open(context.artifacts[TOKENIZER], encoding="utf-8") as handle:
            self.tokenizer = tokenizer_from_json(handle.read())

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would build a schema from them
        # deferred: torch and the model family are needed only once a model is loaded
        import torch

        from raylm.model.generate import generate_text

        options = {**PARAM_DEFAULTS, **{k: v for k, v in (params or {}).items() if v is not None}}
        prompts = prompts_of(model_input)
        with torch.no_grad():
            return generate_text(self.model, self.tokenizer, prompts, int(options["max_new_tokens"]),
                                 temperature=float(options["temperature"]), top_k=int(options["top_k"]) or None,
                                 top_p=float(options["top_p"]),
                                 generator=torch.Generator().manual_seed(int(options["seed"])))


mlflow.models.set_model(RaylmLanguageModel())

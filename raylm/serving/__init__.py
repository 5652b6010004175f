"""Serving a trained checkpoint outside raylm: an MLflow pyfunc model built from code (`pyfunc_model.py`)."""

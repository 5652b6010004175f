# raylm: `make demo` runs the whole pipeline on the built-in corpus; `make test` runs the tests.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.raylm-installed
CONFIG ?= configs/laptop.yaml
PYTEST_ARGS ?=

export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast bench mlflow-ui clean help

help:
	@echo "make demo       run curate -> tokenize -> pretrain -> eval on $(CONFIG) (local Ray, local MLflow)"
	@echo "make test       run the test suite (what CI runs)"
	@echo "make test-fast  unit tests only (no Ray / training)"
	@echo "make bench      run the benchmarks in benchmarks/"
	@echo "make mlflow-ui  open the MLflow UI on the default workspace"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# A torch wheel already on this machine (e.g. a CPU build) before PyPI's default (CUDA, ~5 GB).
	$(PY) -m pip install --quiet --no-index --no-deps 'torch>=2.5' || $(PY) -m pip install --quiet 'torch>=2.5'
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/raylm pipeline --config $(CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

bench: install
	@for script in benchmarks/*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

mlflow-ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/raylm-workspace/mlflow.db --port 5000

clean:
	rm -rf raylm-workspace .pytest_cache

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
	@echo "make demo       run the pipeline (plan, curate, tokenize, pretrain, eval, report) on $(CONFIG) (local Ray, local MLflow)"
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

# Every benchmark at its full (default) size, one after the other; a failure is reported and the rest still run.
# The GPU check runs on a GPU when torch sees one, else in its CPU smoke mode.
bench: install
	@failed=""; \
	for script in benchmarks/[!_]*.py; do \
	  [ "$$script" = benchmarks/gpu_check.py ] && continue; \
	  echo "== $$script"; $(PY) $$script || failed="$$failed $$script"; \
	done; \
	echo "== benchmarks/gpu_check.sh"; \
	if $(PY) -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then smoke=; else smoke=--smoke; fi; \
	PYTHON=$(PY) bash benchmarks/gpu_check.sh $$smoke || failed="$$failed benchmarks/gpu_check.sh"; \
	if [ -n "$$failed" ]; then echo "bench: failed:$$failed"; exit 1; fi

mlflow-ui: install
	@echo "open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (the Model training view)"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/raylm-workspace/mlflow.db --port 5000

clean:
	rm -rf raylm-workspace .pytest_cache

# Two commands do all set-up: `make run` (install, then the whole pipeline on the embedded dataset)
# and `make test` (install, then the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
export SCIKIT_LEARN_DATA := $(CURDIR)/.sklearn_data
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test test-fast clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install --quiet -e ".[pipeline,ray,test]" 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import dna.cli, timm, onnxruntime, prefect, mlflow, dvc"
	touch $@

# The pipeline (dvc.yaml's steps, as tasks of one Prefect flow, recorded in dvc.lock), tracked in MLflow; ends with a
# registered, promoted model.
# PRESET=configs/<name>.yaml runs that preset as a DVC experiment (its differences from params.yaml as -S overrides).
run: setup
	$(PY) -m flows.pipeline $(if $(PRESET),--preset $(PRESET))

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider

# The inner loop: without the end-to-end (slow) and fault-injection (reliability) tests.
test-fast: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not reliability"

clean:
	rm -rf outputs mlflow.db mlruns .prefect .cache dvc.lock

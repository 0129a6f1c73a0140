# Tandem: `make demo` and `make test` are the two commands a newcomer needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tandem-installed
PYTEST_ARGS ?=

.PHONY: setup test typecheck demo bench-engine protos clean

setup: $(STAMP)

# Torch first, pinned: on a machine without a GPU build this takes the local CPU wheel instead of
# letting a dependency resolver pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

test: setup typecheck
	PY=$(PY) bash tests/run_suite.sh $(PYTEST_ARGS)

typecheck: setup
	$(PY) -m mypy engine kvtransfer router prefill_worker decode_worker tandem --ignore-missing-imports --exclude 'tandem/api/'


demo: setup
	$(PY) -m tandem.demo

protos: setup
	$(PY) -m tandem.api.generate

bench-engine: setup
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) build *.egg-info

